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
