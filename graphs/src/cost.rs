//! FLOP counts of graphs, for reporting achieved GFLOP/s in benchmarks.
//! Matrix products and convolutions count 2 FLOPs per multiply-add;
//! elementwise ops, reductions and softmax count one per element touched.
//! Layout ops and constants count zero.

use crate::graph::Graph;
use crate::ops::Op;
use crate::types::numel;

/// FLOPs of evaluating every node of `g` once.
pub fn flops(g: &Graph) -> u64 {
    g.nodes()
        .iter()
        .map(|n| {
            let out = n.ty.numel() as u64;
            let in0 = n
                .inputs
                .first()
                .map(|&i| g.ty(i).numel() as u64)
                .unwrap_or(0);
            match &n.op {
                Op::Input { .. }
                | Op::Const(_)
                | Op::Fill { .. }
                | Op::Reshape(_)
                | Op::Transpose(_)
                | Op::Concat { .. }
                | Op::Slice { .. }
                | Op::Gather { .. }
                | Op::ScatterAdd
                | Op::Expand(_)
                | Op::StopGradient
                | Op::Cast(_) => 0,
                Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where => out,
                Op::Reduce { .. } => in0,
                Op::Softmax { .. } | Op::LogSoftmax { .. } => 4 * out,
                Op::MatMul => {
                    let a = g.shape(n.inputs[0]);
                    2 * out * a[a.len() - 1] as u64
                }
                Op::Conv2d(_) => {
                    let w = g.shape(n.inputs[1]);
                    2 * out * numel(&w[1..]) as u64
                }
                Op::ConvTranspose2d { .. } => {
                    // Same multiply-adds as the forward conv it transposes.
                    let w = g.shape(n.inputs[1]);
                    2 * in0 * numel(&w[1..]) as u64
                }
            }
        })
        .sum()
}
