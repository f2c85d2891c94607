//! Matrix products that share their left operand become one product with the
//! right operands side by side: `A @ B_1, ..., A @ B_k` ->
//! `A @ [B_1 | ... | B_k]`, sliced back into its `k` column blocks.
//!
//! When `A` is large and each `B_i` narrow (the 10,000-example objective set
//! times the 20 columns of one parameter set), each product streams all of
//! `A` from memory for little arithmetic; one wide product streams it once.

use std::collections::HashMap;

use crate::graph::{Graph, NodeId};
use crate::ops::Op;

/// 2-D products grouped by left operand, in node order; groups of two or more
/// whose right operands do not depend on the group's own products.
pub(crate) fn groups(g: &Graph) -> Vec<Vec<NodeId>> {
    let mut by_lhs: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut order = vec![];
    for (i, n) in g.nodes().iter().enumerate() {
        if matches!(n.op, Op::MatMul)
            && g.shape(n.inputs[0]).len() == 2
            && g.shape(n.inputs[1]).len() == 2
        {
            let e = by_lhs.entry(n.inputs[0]).or_default();
            if e.is_empty() {
                order.push(n.inputs[0]);
            }
            e.push(NodeId(i as u32));
        }
    }
    order
        .into_iter()
        .map(|lhs| by_lhs.remove(&lhs).expect("grouped"))
        .filter(|members| members.len() >= 2 && !self_dependent(g, members))
        .collect()
}

/// Does a member's right operand depend on another member of the group?
fn self_dependent(g: &Graph, members: &[NodeId]) -> bool {
    let first = members[0];
    let mut seen = vec![false; g.len()];
    let mut stack: Vec<NodeId> = members.iter().map(|&m| g.node(m).inputs[1]).collect();
    while let Some(n) = stack.pop() {
        if n < first || seen[n.index()] {
            continue;
        }
        seen[n.index()] = true;
        if members.contains(&n) {
            return true;
        }
        stack.extend(&g.node(n).inputs);
    }
    false
}

/// The graph with every group of products sharing a left operand merged.
/// Nodes are re-emitted depth-first from the outputs, so a merged product
/// sits after all of its right operands and before all of its readers.
pub fn merge_shared_lhs_matmuls(g: &Graph) -> Graph {
    let groups = groups(g);
    if groups.is_empty() {
        return g.clone();
    }
    let mut group_of: HashMap<NodeId, usize> = HashMap::new();
    for (k, members) in groups.iter().enumerate() {
        for &m in members {
            group_of.insert(m, k);
        }
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; g.len()];
    // Inputs first, in their order: they are the graph's interface.
    for (i, n) in g.nodes().iter().enumerate() {
        if let Op::Input { name } = &n.op {
            map[i] = Some(out.input(name, n.ty.dtype, &n.ty.shape));
        }
    }
    for (_, id) in g.outputs() {
        emit(g, *id, &groups, &group_of, &mut map, &mut out);
    }
    for (name, id) in g.outputs() {
        out.output(name, map[id.index()].expect("emitted"));
    }
    out
}

/// Emit `root` and everything it needs (an explicit stack: graphs are deep).
fn emit(
    g: &Graph,
    root: NodeId,
    groups: &[Vec<NodeId>],
    group_of: &HashMap<NodeId, usize>,
    map: &mut [Option<NodeId>],
    out: &mut Graph,
) {
    let mut stack = vec![root];
    while let Some(&id) = stack.last() {
        if map[id.index()].is_some() {
            stack.pop();
            continue;
        }
        // What this node (or its whole group) reads.
        let needs: Vec<NodeId> = match group_of.get(&id) {
            Some(&k) => std::iter::once(g.node(id).inputs[0])
                .chain(groups[k].iter().map(|&m| g.node(m).inputs[1]))
                .collect(),
            None => g.node(id).inputs.clone(),
        };
        let missing: Vec<NodeId> = needs
            .into_iter()
            .filter(|x| map[x.index()].is_none())
            .collect();
        if !missing.is_empty() {
            stack.extend(missing);
            continue;
        }
        stack.pop();
        match group_of.get(&id) {
            Some(&k) => {
                let members = &groups[k];
                let lhs = map[g.node(id).inputs[0].index()].expect("emitted");
                let rhs: Vec<NodeId> = members
                    .iter()
                    .map(|&m| map[g.node(m).inputs[1].index()].expect("emitted"))
                    .collect();
                let wide = out.concat(&rhs, 1);
                let prod = out.matmul(lhs, wide);
                let mut col = 0;
                for (&m, &r) in members.iter().zip(&rhs) {
                    let w = out.shape(r)[1];
                    map[m.index()] = Some(out.slice(prod, 1, col, col + w));
                    col += w;
                }
            }
            None => {
                let n = g.node(id);
                let ins: Vec<NodeId> = n
                    .inputs
                    .iter()
                    .map(|x| map[x.index()].expect("emitted"))
                    .collect();
                map[id.index()] = Some(out.node_with(n.op.clone(), &ins));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sine_values;
    use super::*;
    use crate::eval::{eval_graph, Value};
    use crate::types::DType;

    #[test]
    fn merged_products_compute_the_same() {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[6, 5]);
        let b1 = g.input("b1", DType::F32, &[5, 2]);
        let b2 = g.input("b2", DType::F32, &[5, 3]);
        let p1 = g.matmul(a, b1);
        let h = g.tanh(p1);
        let t = g.transpose(h, &[1, 0]);
        let hb = g.matmul(t, a);
        let q = g.transpose(hb, &[1, 0]);
        let p3 = g.matmul(a, q);
        let p2 = g.matmul(a, b2);
        g.output("p2", p2);
        g.output("p3", p3);
        g.output("h", h);
        // a @ b1, a @ b2 and a @ q share `a`, but q depends on a @ b1: the
        // group is left alone.
        assert!(groups(&g).is_empty());

        let mut g2 = Graph::new();
        let a = g2.input("a", DType::F32, &[6, 5]);
        let b1 = g2.input("b1", DType::F32, &[5, 2]);
        let b2 = g2.input("b2", DType::F32, &[5, 3]);
        let p1 = g2.matmul(a, b1);
        let e = g2.exp(p1);
        let p2 = g2.matmul(a, b2);
        g2.output("e", e);
        g2.output("p2", p2);
        let m = merge_shared_lhs_matmuls(&g2);
        assert_eq!(
            m.nodes()
                .iter()
                .filter(|n| matches!(n.op, Op::MatMul))
                .count(),
            1
        );
        let ins: HashMap<String, Value> = [
            ("a".to_string(), sine_values(&[6, 5], 0.7)),
            ("b1".to_string(), sine_values(&[5, 2], 1.3)),
            ("b2".to_string(), sine_values(&[5, 3], 0.4)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            eval_graph(&g2, &ins).unwrap(),
            eval_graph(&m, &ins).unwrap()
        );
    }
}
