//! Column sums of the matrices a merged product concatenates, as products
//! with a row of ones: `ReduceSum(x, axes=[0])` of an `[r, c]` matrix becomes
//! `ones[1, r] @ x` where `x` is also the right operand of a product that
//! `merge_shared_lhs_matmuls` will merge.
//!
//! Autodiff writes the gradient of a bias added to every example as such a
//! sum (over the 10,000 examples of the L2O objective set), next to the
//! weight gradient `X^T @ dH`. The merge concatenates the `dH` of a whole
//! chunk for one wide weight-gradient product; written as products with a
//! shared row of ones, the bias gradients are merged too, into one GEMV over
//! that same concatenation. ONNX Runtime's CPU `ReduceSum` over the leading
//! axis took about 0.3 ms for each `[10000, 20]`; the one GEMV over
//! `[10000, 200]` 0.4-0.7 ms. Sums of matrices that are not merged are left
//! alone: a concatenation made only for them costs more than it saves.

use std::collections::HashSet;

use crate::graph::{Graph, NodeId};
use crate::ops::{Op, ReduceOp};
use crate::types::DType;

/// `g` with every f32 `ReduceSum` over axis 0 of a 2-D tensor that is a
/// merged product's right operand written as a product with a row of ones.
pub fn column_sums_as_products(g: &Graph) -> Graph {
    let merged: HashSet<NodeId> =
        super::merge_matmuls::groups(g, super::merge_matmuls::Shared::Lhs)
            .iter()
            .flatten()
            .map(|&m| g.node(m).inputs[1])
            .collect();
    let is_merged_column_sum = |id: usize| {
        let n = &g.nodes()[id];
        let Op::Reduce {
            op: ReduceOp::Sum,
            axes,
            ..
        } = &n.op
        else {
            return false;
        };
        let x = g.node(n.inputs[0]);
        axes.as_slice() == [0]
            && merged.contains(&n.inputs[0])
            && x.ty.dtype == DType::F32
            && x.ty.shape.len() == 2
    };
    if !(0..g.len()).any(is_merged_column_sum) {
        return g.clone();
    }
    super::rewrite_nodes(g, |out, i, n, ins, _| {
        let Op::Reduce { keepdims, .. } = &n.op else {
            return None;
        };
        if !is_merged_column_sum(i) {
            return None;
        }
        let x = ins[0];
        let [rows, cols] = out.shape(x)[..] else {
            unreachable!("a 2-D input")
        };
        let ones = out.fill(1.0, DType::F32, &[1, rows]);
        let row = out.matmul(ones, x);
        Some(if *keepdims {
            row
        } else {
            out.reshape(row, &[cols])
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::{assert_same_outputs, count_ops, sine_inputs};
    use super::*;

    #[test]
    fn column_sums_of_merged_operands_become_products_with_the_same_values() {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[5, 40]);
        let x = g.input("x", DType::F32, &[40, 3]);
        let w = g.input("w", DType::F32, &[40, 2]);
        let y = g.input("y", DType::F32, &[4, 3]);
        let z = g.input("z", DType::F32, &[40, 3]);
        let ax = g.matmul(a, x);
        let aw = g.matmul(a, w);
        let sx = g.sum(x, &[0], false);
        let sxk = g.sum(x, &[0], true);
        let sw = g.sum(w, &[0], false);
        let sy = g.sum(y, &[0], false);
        let sz = g.sum(z, &[0], false);
        let rows = g.sum(x, &[1], false);
        for (name, id) in [
            ("ax", ax),
            ("aw", aw),
            ("sx", sx),
            ("sxk", sxk),
            ("sw", sw),
            ("sy", sy),
            ("sz", sz),
            ("rows", rows),
        ] {
            g.output(name, id);
        }
        let r = column_sums_as_products(&g);
        // The three sums over the rows of x and w (merged operands) are
        // products; y and z (not merged) and the row sums are left alone.
        assert_eq!(count_ops(&r, |op| matches!(op, Op::MatMul)), 5);
        assert_eq!(count_ops(&r, |op| matches!(op, Op::Reduce { .. })), 3);
        let ins = sine_inputs(&[
            ("a", &[5, 40], 0.2),
            ("x", &[40, 3], 0.3),
            ("w", &[40, 2], 0.5),
            ("y", &[4, 3], 0.9),
            ("z", &[40, 3], 1.1),
        ]);
        assert_same_outputs(&g, &r, &ins);
    }
}
