//! Products of row-stacked tensors, split by block before fusion:
//! `A @ concat_rows(X_1, ..., X_m)^T = concat_cols(A @ X_1^T, ..., A @ X_m^T)`
//! and `concat_rows(X_1, ..., X_m) @ B = concat_rows(X_1 @ B, ..., X_m @ B)`.
//!
//! In the HierarchicalRNN's graphs a GRU's input is the `Concat` of its
//! features, hidden state and a row of ones (`[26, N]`), read by the gates'
//! product inside a column-local cluster and, in `step_vjp`, by the weight
//! gradient `dY @ X^T`, a reduction over the `N` parameters that stays with
//! ONNX Runtime. That second reader made the cluster write the whole
//! concatenation out, although its blocks are the cluster's inputs or values
//! it writes anyway. Split, the reduction reads the blocks, and the
//! concatenation stays inside the cluster.

use super::cluster::column_local_shape;
use crate::graph::{Graph, Node, NodeId};
use crate::ops::Op;

/// The blocks of a row-stacked `Concat` of a column-local shape.
fn row_blocks(g: &Graph, x: NodeId) -> Option<Vec<NodeId>> {
    let n = g.node(x);
    match n.op {
        Op::Concat { axis: 0 } if column_local_shape(&n.ty.shape) => Some(n.inputs.clone()),
        _ => None,
    }
}

/// The blocks of `Transpose(Concat_rows(...))` (a 2-D transpose).
fn transposed_row_blocks(g: &Graph, x: NodeId) -> Option<Vec<NodeId>> {
    let n = g.node(x);
    match &n.op {
        Op::Transpose(perm) if perm.as_slice() == [1, 0] => row_blocks(g, n.inputs[0]),
        _ => None,
    }
}

/// `g` with every 2-D product of a row-stacked concatenation of a
/// column-local shape (on the left, or transposed on the right) split into
/// products of its blocks. The concatenations stay for their other readers.
pub fn split_row_stacked_products(g: &Graph) -> Graph {
    let is_2d_product =
        |n: &Node| matches!(n.op, Op::MatMul) && n.inputs.iter().all(|&i| g.shape(i).len() == 2);
    let splits = |n: &Node| {
        is_2d_product(n)
            && (row_blocks(g, n.inputs[0]).is_some()
                || transposed_row_blocks(g, n.inputs[1]).is_some())
    };
    if !g.nodes().iter().any(splits) {
        return g.clone();
    }
    crate::passes::rewrite_nodes(g, |out, _, n, ins, map| {
        if !splits(n) {
            return None;
        }
        // A transposed right operand first: where both operands are
        // concatenations, the left one's blocks (the gradients of a weight
        // gradient) are written out either way.
        if let Some(blocks) = transposed_row_blocks(g, n.inputs[1]) {
            let parts: Vec<NodeId> = blocks
                .iter()
                .map(|b| {
                    let t = out.transpose(map[b.index()], &[1, 0]);
                    out.matmul(ins[0], t)
                })
                .collect();
            return Some(out.concat(&parts, 1));
        }
        let blocks = row_blocks(g, n.inputs[0]).expect("checked");
        let parts: Vec<NodeId> = blocks
            .iter()
            .map(|b| out.matmul(map[b.index()], ins[1]))
            .collect();
        Some(out.concat(&parts, 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{assert_same_outputs, count_ops, sine_inputs};
    use crate::types::DType;

    #[test]
    fn products_of_stacked_rows_split_with_the_same_values() {
        const N: usize = 1030;
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[3, 2]);
        let b = g.input("b", DType::F32, &[2, N]);
        let dy = g.input("dy", DType::F32, &[4, N]);
        let o = g.input("o", DType::F32, &[N, 5]);
        let ab = g.matmul(a, b); // [3, N]
        let x = g.concat(&[ab, b], 0); // [5, N]
        let xt = g.transpose(x, &[1, 0]);
        let dw = g.matmul(dy, xt); // [4, 5]
        let means = g.matmul(x, o); // [5, 5]
        let small = g.concat(&[a, a], 0); // [6, 2]: not column-local
        let kept = g.matmul(small, b);
        g.output("dw", dw);
        g.output("means", means);
        g.output("kept", kept);
        g.output("x", x);
        let r = split_row_stacked_products(&g);
        let count = |g: &Graph| count_ops(g, |op| matches!(op, Op::MatMul));
        // Two products split in two; the small concatenation's is kept.
        assert_eq!((count(&g), count(&r)), (4, 6));
        let ins = sine_inputs(&[
            ("a", &[3, 2], 0.2),
            ("b", &[2, N], 0.3),
            ("dy", &[4, N], 0.5),
            ("o", &[N, 5], 0.7),
        ]);
        assert_same_outputs(&g, &r, &ins);
    }
}
