//! Graph passes. `optimize` runs them all: one forward rebuild that
//! simplifies the zeros and ones autodiff produces, folds constants and
//! shares common subexpressions, followed by dead-code elimination.

pub mod column_sums;
pub mod dce;
pub mod merge_matmuls;
mod rebuild;
mod simplify;

pub use column_sums::column_sums_as_products;
pub use dce::dce;
pub use merge_matmuls::{merge_shared_lhs_matmuls, merge_shared_rhs_matmuls};
pub use rebuild::{cse_fold_simplify, RebuildOptions};

use crate::graph::{Graph, Node, NodeId};

/// The standard pipeline, run before export.
pub fn optimize(g: &Graph) -> Graph {
    let g = cse_fold_simplify(g, &RebuildOptions::default());
    dce(&g)
}

/// `g` copied node by node into a new graph, except where `replace` emits
/// something else for a node. It gets the new graph, the node's index, the
/// node, its inputs in the new graph, and where every earlier node went
/// (indexed by old node). Inputs and outputs keep their names.
pub fn rewrite_nodes(
    g: &Graph,
    mut replace: impl FnMut(&mut Graph, usize, &Node, &[NodeId], &[NodeId]) -> Option<NodeId>,
) -> Graph {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    for (i, n) in g.nodes().iter().enumerate() {
        let ins: Vec<NodeId> = n.inputs.iter().map(|x| map[x.index()]).collect();
        let id = match &n.op {
            crate::ops::Op::Input { name } => out.input(name, n.ty.dtype, &n.ty.shape),
            op => match replace(&mut out, i, n, &ins, &map) {
                Some(id) => id,
                None => out.node_with(op.clone(), &ins),
            },
        };
        map.push(id);
    }
    for (name, id) in g.outputs() {
        out.output(name, map[id.index()]);
    }
    out
}

/// Test inputs: `sin(i * k)` at flat index `i`.
#[cfg(test)]
pub(crate) fn sine_values(shape: &[usize], k: f64) -> crate::eval::Value {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| (i as f64 * k).sin()).collect();
    crate::eval::Value::F(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), data).expect("shape and data agree"),
    )
}

/// Test inputs by name: `(name, shape, k)` as [`sine_values`].
#[cfg(test)]
pub(crate) fn sine_inputs(
    specs: &[(&str, &[usize], f64)],
) -> std::collections::HashMap<String, crate::eval::Value> {
    specs
        .iter()
        .map(|&(name, shape, k)| (name.to_string(), sine_values(shape, k)))
        .collect()
}

/// Nodes of `g` whose op satisfies `which`.
#[cfg(test)]
pub(crate) fn count_ops(g: &Graph, which: impl Fn(&crate::ops::Op) -> bool) -> usize {
    g.nodes().iter().filter(|n| which(&n.op)).count()
}

/// A rewritten graph computes what the original computes: every f32
/// output, evaluated in f64 on `inputs`, to 1e-9 relative.
#[cfg(test)]
pub(crate) fn assert_same_outputs(
    original: &Graph,
    rewritten: &Graph,
    inputs: &std::collections::HashMap<String, crate::eval::Value>,
) {
    use crate::eval::{eval_graph, Value};
    let want = eval_graph(original, inputs).expect("the original evaluates");
    let got = eval_graph(rewritten, inputs).expect("the rewritten graph evaluates");
    assert_eq!(want.len(), got.len(), "output count");
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        let (Value::F(a), Value::F(b)) = (a, b) else {
            panic!("{name}: f32 outputs expected")
        };
        assert_eq!(a.shape(), b.shape(), "{name}");
        for (p, q) in a.iter().zip(b) {
            assert!(
                (p - q).abs() < 1e-9 * p.abs().max(1.0),
                "{name}: {p} vs {q}"
            );
        }
    }
}
