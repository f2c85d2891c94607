//! Reductions over the columns of column-local tensors, rewritten before
//! fusion into the contraction form `X @ Transpose(Y)` that a column-local
//! cluster computes (see [`super::cluster`]), reading the rows of `Y` as it
//! reads `X`'s:
//!
//! - products `X[p, n] @ C[n, q]` with a constant `C` (the HierarchicalRNN's
//!   per-tensor sums: `C` is one-hot, a column per parameter tensor) become
//!   `X @ Transpose(C^T)`;
//! - sums and means over the columns of `X[p, n]` (a loss averaged over the
//!   examples of a set laid out as columns) become `X @ Transpose(ones[1,
//!   n])`, after a sum over rows where they reduce both axes;
//! - reductions over the rows that drop the row axis (`[k, n] -> [n]`) keep
//!   it (`[1, n]`, which a cluster computes), reshaped to `[n]` after.
//!
//! Only where `X` is a value a column-local cluster can compute.
//!
//! Where no cluster takes one, ONNX Runtime runs the product (and folds the
//! constant transpose when it loads the model).

use std::collections::HashMap;

use super::cluster::{column_local_node, column_local_shape};
use crate::graph::{Graph, NodeId};
use crate::ops::{Op, ReduceOp};
use crate::types::{Tensor, TensorData};

/// The constant `[n, q]` right operand of a 2-D product over a column-local
/// `n`.
fn constant_operand(g: &Graph, id: NodeId) -> Option<&Tensor> {
    let n = g.node(id);
    if !matches!(n.op, Op::MatMul) || n.inputs.len() != 2 {
        return None;
    }
    let (x, c) = (n.inputs[0], n.inputs[1]);
    if !column_local_shape(g.shape(x)) || !column_local_node(g, x) {
        return None;
    }
    let t = g.const_value(c)?;
    let (&[rows, cols], TensorData::F32(_)) = (t.shape.as_slice(), &t.data) else {
        return None;
    };
    column_local_shape(&[cols, rows]).then_some(t)
}

/// A 2-D f32 constant, transposed.
fn transposed(t: &Tensor) -> Tensor {
    let (&[rows, cols], TensorData::F32(v)) = (t.shape.as_slice(), &t.data) else {
        unreachable!("checked by constant_operand")
    };
    let data = (0..cols)
        .flat_map(|j| (0..rows).map(move |i| v[i * cols + j]))
        .collect();
    Tensor::f32(&[cols, rows], data)
}

/// A sum or mean over the columns (and maybe the rows) of a column-local
/// value: whether it is a mean, and whether it reduces the rows too.
fn column_reduction(g: &Graph, id: NodeId) -> Option<(bool, bool)> {
    let n = g.node(id);
    let Op::Reduce { op, axes, .. } = &n.op else {
        return None;
    };
    let mean = match op {
        ReduceOp::Sum => false,
        ReduceOp::Mean => true,
        ReduceOp::Max => return None,
    };
    // Only where a cluster can compute the operand: a product by itself (of
    // a graph input, say) runs slower in ONNX Runtime than the reduction.
    let x = n.inputs[0];
    if !column_local_node(g, x) || g.dtype(id) != crate::types::DType::F32 {
        return None;
    }
    match axes.as_slice() {
        [1] => Some((mean, false)),
        [0, 1] => Some((mean, true)),
        _ => None,
    }
}

/// A reduction over the rows of a column-local value that drops the row
/// axis: its operator.
fn flat_row_reduction(g: &Graph, id: NodeId) -> Option<ReduceOp> {
    match &g.node(id).op {
        Op::Reduce {
            op,
            axes,
            keepdims: false,
        } if axes.as_slice() == [0]
            && g.shape(id).len() == 1
            && column_local_node(g, g.node(id).inputs[0]) =>
        {
            Some(*op)
        }
        _ => None,
    }
}

/// `g` with products by constants and reductions over columns in
/// contraction form (each constant stored transposed once, however many
/// products read it; one row of ones per column count), and reductions over
/// rows keeping their row.
pub fn contraction_forms(g: &Graph) -> Graph {
    let applies = |i: usize| {
        let id = NodeId(i as u32);
        constant_operand(g, id).is_some()
            || column_reduction(g, id).is_some()
            || flat_row_reduction(g, id).is_some()
    };
    if !(0..g.len()).any(applies) {
        return g.clone();
    }
    let mut constants: HashMap<NodeId, NodeId> = HashMap::new();
    let mut ones: HashMap<usize, NodeId> = HashMap::new();
    crate::passes::rewrite_nodes(g, |out, i, n, ins, _| {
        let id = NodeId(i as u32);
        if let Some(c) = constant_operand(g, id) {
            let t = *constants.entry(n.inputs[1]).or_insert_with(|| {
                let ct = out.constant(transposed(c));
                out.transpose(ct, &[1, 0])
            });
            return Some(out.matmul(ins[0], t));
        }
        if let Some(op) = flat_row_reduction(g, id) {
            let r = out.reduce(op, ins[0], &[0], true);
            return Some(out.reshape(r, &n.ty.shape));
        }
        let (mean, both) = column_reduction(g, id)?;
        let &[rows, cols] = g.shape(n.inputs[0]) else {
            unreachable!("a column-local shape")
        };
        let x = if both && rows > 1 {
            out.sum(ins[0], &[0], true)
        } else {
            ins[0]
        };
        let t = *ones.entry(cols).or_insert_with(|| {
            let c = out.constant(Tensor::f32(&[1, cols], vec![1.0; cols]));
            out.transpose(c, &[1, 0])
        });
        let mut r = out.matmul(x, t);
        if mean {
            let count = if both { rows * cols } else { cols };
            r = out.mul_scalar(r, 1.0 / count as f32);
        }
        Some(out.reshape(r, &n.ty.shape))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{assert_same_outputs, count_ops, sine_inputs};
    use crate::types::DType;

    #[test]
    fn contraction_forms_keep_their_values() {
        const N: usize = 1030;
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[3, N]);
        // Row i of the one-hot matrix marks the quarter of the rows it is in.
        let onehot: Vec<f32> = (0..N * 4)
            .map(|k| f32::from((k / 4) * 4 / N == k % 4))
            .collect();
        let c = g.constant(Tensor::f32(&[N, 4], onehot));
        let sums = g.matmul(x, c);
        let x2 = g.exp(x);
        let sums2 = g.matmul(x2, c);
        g.output("sums2", sums2);
        let small = g.constant(Tensor::f32(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let y = g.input("y", DType::F32, &[4, 3]);
        let kept = g.matmul(y, small);
        g.output("sums", sums);
        g.output("kept", kept);
        // Column sums and means, of one axis and of both.
        let col_means = g.mean(x, &[1], false);
        let total = g.sum_all(x2);
        let per_row = g.sum(x2, &[1], true);
        g.output("col_means", col_means);
        // A row sum without its row axis keeps it, then reshapes.
        let flat = g.sum(x2, &[0], false);
        g.output("flat", flat);
        // A sum of a graph input: no cluster computes it, so it stays.
        let kept_sum = g.sum(x, &[1], false);
        g.output("kept_sum", kept_sum);
        g.output("total", total);
        g.output("per_row", per_row);
        let r = contraction_forms(&g);
        let transposes = |g: &Graph| count_ops(g, |op| matches!(op, Op::Transpose(_)));
        // One transposed one-hot matrix and one row of ones.
        assert_eq!((transposes(&g), transposes(&r)), (0, 2));
        // Left: the mean and the sum of the input `x` (no cluster computes
        // their operand, so they stay), the flat sum (kept as a row), and the
        // row sum before the total's contraction.
        assert_eq!(count_ops(&r, |op| matches!(op, Op::Reduce { .. })), 4);
        let ins = sine_inputs(&[("x", &[3, N], 0.3), ("y", &[4, 3], 0.7)]);
        assert_same_outputs(&g, &r, &ins);
    }
}
