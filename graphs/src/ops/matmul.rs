//! Batched matrix product with numpy semantics (both operands of rank >= 2,
//! batch axes broadcast).

use ndarray::{Array2, ArrayD, Axis, IxDyn};

use crate::eval::Value;
use crate::graph::{broadcast_shapes, Graph, NodeId};
use crate::types::{numel, DType, TensorType};

pub fn shape(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if a.dtype != DType::F32 || b.dtype != DType::F32 {
        return Err("operands must be f32".into());
    }
    if a.rank() < 2 || b.rank() < 2 {
        return Err("operands must have rank >= 2 (reshape vectors first)".into());
    }
    let (m, k) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
    let (k2, n) = (b.shape[b.rank() - 2], b.shape[b.rank() - 1]);
    if k != k2 {
        return Err(format!("inner dimensions differ: {k} vs {k2}"));
    }
    let mut s = broadcast_shapes(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])?;
    s.push(m);
    s.push(n);
    Ok(TensorType::f32(&s))
}

pub fn eval(a: &Value, b: &Value, out: &TensorType) -> Value {
    let r = out.rank();
    let batch = &out.shape[..r - 2];
    let nb = numel(batch);
    let to3 = |x: &ArrayD<f64>| -> ndarray::Array3<f64> {
        let (p, q) = (x.shape()[x.ndim() - 2], x.shape()[x.ndim() - 1]);
        let mut s = batch.to_vec();
        s.extend([p, q]);
        let v: Vec<f64> = x
            .broadcast(IxDyn(&s))
            .expect("batch broadcast")
            .iter()
            .copied()
            .collect();
        ndarray::Array3::from_shape_vec((nb, p, q), v).unwrap()
    };
    let (a3, b3) = (to3(a.f()), to3(b.f()));
    let mut res = Vec::with_capacity(out.numel());
    for i in 0..nb {
        let p: Array2<f64> = a3.index_axis(Axis(0), i).dot(&b3.index_axis(Axis(0), i));
        res.extend(p.iter());
    }
    Value::F(ArrayD::from_shape_vec(IxDyn(&out.shape), res).unwrap())
}

pub fn vjp(g: &mut Graph, a: NodeId, b: NodeId, dy: NodeId) -> Vec<Option<NodeId>> {
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    let bt = g.transpose_last2(b);
    let da = g.matmul(dy, bt);
    let da = g.sum_to_shape(da, &sa);
    let db = if sb.len() == 2 && sa.len() > 2 {
        // A common case (a shared weight applied to a batch of sequences):
        // fold the batch axes into rows and do one matmul instead of a
        // batched product followed by a reduction.
        let k = sa[sa.len() - 1];
        let n = sb[1];
        let rows = numel(&sa) / k;
        let a2 = g.reshape(a, &[rows, k]);
        let dy2 = g.reshape(dy, &[rows, n]);
        let a2t = g.transpose(a2, &[1, 0]);
        g.matmul(a2t, dy2)
    } else {
        let at = g.transpose_last2(a);
        let db = g.matmul(at, dy);
        g.sum_to_shape(db, &sb)
    };
    vec![Some(da), Some(db)]
}

pub fn jvp(
    g: &mut Graph,
    a: NodeId,
    b: NodeId,
    da: Option<NodeId>,
    db: Option<NodeId>,
) -> Option<NodeId> {
    let l = da.map(|d| g.matmul(d, b));
    let r = db.map(|d| g.matmul(a, d));
    let t = g.add_opt(l, r)?;
    Some(t)
}
