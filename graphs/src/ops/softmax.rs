//! Softmax and LogSoftmax along one axis.

use ndarray::{Axis, Zip};

use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::types::{DType, TensorType};

pub fn shape(x: &TensorType, axis: usize) -> Result<TensorType, String> {
    if x.dtype != DType::F32 {
        return Err(format!("expects f32, got {}", x.dtype));
    }
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    Ok(x.clone())
}

pub fn eval(x: &Value, axis: usize, log: bool) -> Value {
    let a = x.f();
    let m = a
        .fold_axis(Axis(axis), f64::NEG_INFINITY, |&m, &v| m.max(v))
        .insert_axis(Axis(axis));
    let shifted = a - &m;
    let lse = shifted
        .mapv(f64::exp)
        .sum_axis(Axis(axis))
        .mapv(f64::ln)
        .insert_axis(Axis(axis));
    let mut out = shifted;
    Zip::from(&mut out)
        .and_broadcast(&lse)
        .for_each(|o, &l| *o = if log { *o - l } else { (*o - l).exp() });
    Value::F(out)
}

/// dx = y * (dy - sum(dy * y)); the Jacobian is symmetric, so the same
/// expression is the JVP.
pub fn softmax_vjp(g: &mut Graph, y: NodeId, axis: usize, dy: NodeId) -> NodeId {
    let p = g.mul(dy, y);
    let s = g.sum(p, &[axis], true);
    let d = g.sub(dy, s);
    g.mul(y, d)
}

pub fn softmax_jvp(g: &mut Graph, y: NodeId, axis: usize, dx: NodeId) -> NodeId {
    softmax_vjp(g, y, axis, dx)
}

/// dx = dy - softmax(x) * sum(dy).
pub fn log_softmax_vjp(g: &mut Graph, y: NodeId, axis: usize, dy: NodeId) -> NodeId {
    let p = g.exp(y);
    let s = g.sum(dy, &[axis], true);
    let ps = g.mul(p, s);
    g.sub(dy, ps)
}

/// t = dx - sum(softmax(x) * dx).
pub fn log_softmax_jvp(g: &mut Graph, y: NodeId, axis: usize, dx: NodeId) -> NodeId {
    let p = g.exp(y);
    let pd = g.mul(p, dx);
    let s = g.sum(pd, &[axis], true);
    g.sub(dx, s)
}
