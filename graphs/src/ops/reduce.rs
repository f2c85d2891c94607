//! Reductions over a set of axes: sum, mean, max.

use ndarray::{ArrayD, Axis, IxDyn};

use super::ReduceOp;
use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::types::{DType, TensorType};

pub fn shape(x: &TensorType, axes: &[usize], keepdims: bool) -> Result<TensorType, String> {
    if x.dtype == DType::Bool {
        return Err("cannot reduce a bool tensor".into());
    }
    if let Some(a) = axes.iter().find(|&&a| a >= x.rank()) {
        return Err(format!("axis {a} out of range for rank {}", x.rank()));
    }
    let s: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| {
            if axes.contains(&i) {
                keepdims.then_some(1)
            } else {
                Some(d)
            }
        })
        .collect();
    Ok(TensorType::new(x.dtype, &s))
}

fn reduce_f(op: ReduceOp, a: &ArrayD<f64>, axes: &[usize]) -> ArrayD<f64> {
    let mut r = a.clone();
    for &ax in axes.iter().rev() {
        r = match op {
            ReduceOp::Sum => r.sum_axis(Axis(ax)),
            ReduceOp::Mean => r.mean_axis(Axis(ax)).expect("non-empty axis"),
            ReduceOp::Max => r.fold_axis(Axis(ax), f64::NEG_INFINITY, |&m, &v| {
                if v > m || v.is_nan() {
                    v
                } else {
                    m
                }
            }),
        };
    }
    r
}

pub fn eval(op: ReduceOp, x: &Value, axes: &[usize], out: &TensorType) -> Value {
    match x {
        Value::F(a) => {
            let r = reduce_f(op, a, axes);
            Value::F(r.into_shape_with_order(IxDyn(&out.shape)).unwrap())
        }
        Value::I(a) => {
            let r = reduce_f(op, &a.mapv(|v| v as f64), axes);
            Value::I(
                r.mapv(|v| v as i64)
                    .into_shape_with_order(IxDyn(&out.shape))
                    .unwrap(),
            )
        }
        Value::B(_) => unreachable!("type-checked"),
    }
}

/// Shape of the input with the reduced axes kept as 1 (to broadcast back).
fn kept_shape(g: &Graph, x: NodeId, axes: &[usize]) -> Vec<usize> {
    g.shape(x)
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect()
}

/// Mask of the maximal elements, normalised so that ties share the gradient.
fn max_weights(g: &mut Graph, x: NodeId, y: NodeId, axes: &[usize]) -> NodeId {
    let kept = kept_shape(g, x, axes);
    let yk = g.reshape(y, &kept);
    let hit = g.equal(x, yk);
    let m = g.cast(hit, DType::F32);
    let count = g.sum(m, axes, true);
    g.div(m, count)
}

pub fn vjp(
    g: &mut Graph,
    op: ReduceOp,
    x: NodeId,
    y: NodeId,
    axes: &[usize],
    _keepdims: bool,
    dy: NodeId,
) -> NodeId {
    let xs = g.shape(x).to_vec();
    let kept = kept_shape(g, x, axes);
    let dyk = g.reshape(dy, &kept);
    match op {
        ReduceOp::Sum => g.expand(dyk, &xs),
        ReduceOp::Mean => {
            let n: usize = axes.iter().map(|&a| xs[a]).product();
            let s = g.mul_scalar(dyk, 1.0 / n as f32);
            g.expand(s, &xs)
        }
        ReduceOp::Max => {
            let w = max_weights(g, x, y, axes);
            g.mul(w, dyk)
        }
    }
}

pub fn max_jvp(
    g: &mut Graph,
    x: NodeId,
    y: NodeId,
    axes: &[usize],
    keepdims: bool,
    dx: NodeId,
) -> NodeId {
    let w = max_weights(g, x, y, axes);
    let p = g.mul(w, dx);
    g.sum(p, axes, keepdims)
}
