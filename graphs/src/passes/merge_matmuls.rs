//! Matrix products that share their left operand become one product with the
//! right operands side by side: `A @ B_1, ..., A @ B_k` ->
//! `A @ [B_1 | ... | B_k]`, sliced back into its `k` column blocks; products
//! that share their right operand, one product with the left operands
//! stacked: `A_1 @ B, ..., A_k @ B` -> `[A_1; ...; A_k] @ B`, sliced back
//! into row blocks.
//!
//! When `A` is large and each `B_i` narrow (the 10,000-example objective set
//! times the 20 columns of one parameter set), each product streams all of
//! `A` from memory for little arithmetic; one wide product streams it once.

use std::collections::HashMap;

use crate::graph::{Graph, NodeId};
use crate::ops::Op;

/// Which operand the products of a group share.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shared {
    Lhs,
    Rhs,
}

impl Shared {
    /// The input index of the shared operand and of the other one.
    fn inputs(self) -> (usize, usize) {
        match self {
            Shared::Lhs => (0, 1),
            Shared::Rhs => (1, 0),
        }
    }
}

/// 2-D products grouped by their `shared` operand, in node order; groups
/// of two or more whose other operands do not depend on the group's own
/// products.
pub(crate) fn groups(g: &Graph, shared: Shared) -> Vec<Vec<NodeId>> {
    let (s, _) = shared.inputs();
    let mut by_operand: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut order = vec![];
    for (i, n) in g.nodes().iter().enumerate() {
        if matches!(n.op, Op::MatMul)
            && g.shape(n.inputs[0]).len() == 2
            && g.shape(n.inputs[1]).len() == 2
        {
            let e = by_operand.entry(n.inputs[s]).or_default();
            if e.is_empty() {
                order.push(n.inputs[s]);
            }
            e.push(NodeId(i as u32));
        }
    }
    order
        .into_iter()
        .map(|x| by_operand.remove(&x).expect("grouped"))
        .filter(|members| members.len() >= 2 && !self_dependent(g, members, shared))
        .collect()
}

/// Does a member's other operand depend on another member of the group?
fn self_dependent(g: &Graph, members: &[NodeId], shared: Shared) -> bool {
    let (_, o) = shared.inputs();
    let first = members[0];
    let mut seen = vec![false; g.len()];
    let mut stack: Vec<NodeId> = members.iter().map(|&m| g.node(m).inputs[o]).collect();
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
    merge(g, Shared::Lhs)
}

/// The graph with every group of products sharing a right operand merged
/// (the left operands stacked by rows).
pub fn merge_shared_rhs_matmuls(g: &Graph) -> Graph {
    merge(g, Shared::Rhs)
}

fn merge(g: &Graph, shared: Shared) -> Graph {
    let groups = groups(g, shared);
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
        emit(g, *id, shared, &groups, &group_of, &mut map, &mut out);
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
    shared: Shared,
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
        let (s, o) = shared.inputs();
        // What this node (or its whole group) reads.
        let needs: Vec<NodeId> = match group_of.get(&id) {
            Some(&k) => std::iter::once(g.node(id).inputs[s])
                .chain(groups[k].iter().map(|&m| g.node(m).inputs[o]))
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
                let common = map[g.node(id).inputs[s].index()].expect("emitted");
                let others: Vec<NodeId> = members
                    .iter()
                    .map(|&m| map[g.node(m).inputs[o].index()].expect("emitted"))
                    .collect();
                // Side by side (shared left operand) or stacked (shared right
                // operand); the product's blocks along that axis.
                let axis = o;
                let joined = out.concat(&others, axis);
                let prod = match shared {
                    Shared::Lhs => out.matmul(common, joined),
                    Shared::Rhs => out.matmul(joined, common),
                };
                let mut at = 0;
                for (&m, &x) in members.iter().zip(&others) {
                    let w = out.shape(x)[axis];
                    map[m.index()] = Some(out.slice(prod, axis, at, at + w));
                    at += w;
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
    use super::super::{assert_same_outputs, count_ops, sine_inputs};
    use super::*;
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
        assert!(groups(&g, Shared::Lhs).is_empty());

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
        assert_eq!(count_ops(&m, |op| matches!(op, Op::MatMul)), 1);
        let ins = sine_inputs(&[
            ("a", &[6, 5], 0.7),
            ("b1", &[5, 2], 1.3),
            ("b2", &[5, 3], 0.4),
        ]);
        assert_same_outputs(&g2, &m, &ins);
    }

    #[test]
    fn products_sharing_a_right_operand_merge_by_rows() {
        let mut g = Graph::new();
        let b = g.input("b", DType::F32, &[5, 6]);
        let a1 = g.input("a1", DType::F32, &[2, 5]);
        let a2 = g.input("a2", DType::F32, &[3, 5]);
        let p1 = g.matmul(a1, b);
        let e = g.exp(p1);
        let p2 = g.matmul(a2, b);
        g.output("e", e);
        g.output("p2", p2);
        let m = merge_shared_rhs_matmuls(&g);
        let products = |g: &Graph| count_ops(g, |op| matches!(op, Op::MatMul));
        assert_eq!((products(&g), products(&m)), (2, 1));
        let ins = sine_inputs(&[
            ("b", &[5, 6], 0.7),
            ("a1", &[2, 5], 1.3),
            ("a2", &[3, 5], 0.4),
        ]);
        assert_same_outputs(&g, &m, &ins);
    }
}
