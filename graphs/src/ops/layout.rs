//! Layout ops: reshape, transpose, concat, slice, gather, expand.

use ndarray::{ArrayD, Axis, IxDyn};

use super::Op;
use crate::eval::Value;
use crate::graph::{broadcast_shapes, Graph, NodeId};
use crate::types::{numel, DType, TensorType};

pub fn reshape_shape(x: &TensorType, s: &[usize]) -> Result<TensorType, String> {
    if numel(s) != x.numel() {
        return Err(format!("cannot reshape {} elements to {s:?}", x.numel()));
    }
    Ok(TensorType::new(x.dtype, s))
}

pub fn transpose_shape(x: &TensorType, perm: &[usize]) -> Result<TensorType, String> {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank()
        || perm
            .iter()
            .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!(
            "{perm:?} is not a permutation of {} axes",
            x.rank()
        ));
    }
    let s: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    Ok(TensorType::new(x.dtype, &s))
}

pub fn concat_shape(xs: &[&TensorType], axis: usize) -> Result<TensorType, String> {
    let first = xs.first().ok_or("needs at least one input")?;
    if axis >= first.rank() {
        return Err(format!(
            "axis {axis} out of range for rank {}",
            first.rank()
        ));
    }
    let mut s = first.shape.clone();
    s[axis] = 0;
    for x in xs {
        let same = x.dtype == first.dtype
            && x.rank() == first.rank()
            && x.shape
                .iter()
                .zip(&first.shape)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !same {
            return Err("inputs differ in dtype, rank or a non-concatenated dimension".into());
        }
        s[axis] += x.shape[axis];
    }
    Ok(TensorType::new(first.dtype, &s))
}

pub fn slice_shape(
    x: &TensorType,
    axis: usize,
    start: usize,
    end: usize,
) -> Result<TensorType, String> {
    if axis >= x.rank() || start > end || end > x.shape[axis] {
        return Err(format!("slice {start}..{end} on axis {axis} out of range"));
    }
    let mut s = x.shape.clone();
    s[axis] = end - start;
    Ok(TensorType::new(x.dtype, &s))
}

pub fn gather_shape(x: &TensorType, idx: &TensorType, axis: usize) -> Result<TensorType, String> {
    if idx.dtype != DType::I64 {
        return Err(format!("indices must be i64, got {}", idx.dtype));
    }
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    let mut s = x.shape[..axis].to_vec();
    s.extend(&idx.shape);
    s.extend(&x.shape[axis + 1..]);
    Ok(TensorType::new(x.dtype, &s))
}

pub fn scatter_add_shape(
    x: &TensorType,
    idx: &TensorType,
    upd: &TensorType,
) -> Result<TensorType, String> {
    if idx.dtype != DType::I64 || idx.rank() != 1 {
        return Err(format!(
            "indices must be i64 [k], got {} {:?}",
            idx.dtype, idx.shape
        ));
    }
    if !x.dtype.is_float() || upd.dtype != x.dtype {
        return Err(format!(
            "data and updates must be one float type, got {} and {}",
            x.dtype, upd.dtype
        ));
    }
    let mut want = vec![idx.shape[0]];
    if x.rank() == 0 {
        return Err("data must have an axis to scatter into".into());
    }
    want.extend(&x.shape[1..]);
    if upd.shape != want {
        return Err(format!(
            "updates must be {want:?} for data {:?} and {} indices, got {:?}",
            x.shape, idx.shape[0], upd.shape
        ));
    }
    Ok(x.clone())
}

pub fn expand_shape(x: &TensorType, s: &[usize]) -> Result<TensorType, String> {
    let b = broadcast_shapes(&x.shape, s)?;
    if b != s {
        return Err(format!("cannot expand {:?} to {s:?}", x.shape));
    }
    Ok(TensorType::new(x.dtype, s))
}

// ---- evaluation -------------------------------------------------------------

pub fn concat_eval(xs: &[&Value], axis: usize) -> Value {
    fn cat<T: Clone>(xs: Vec<&ArrayD<T>>, axis: usize) -> ArrayD<T> {
        let views: Vec<_> = xs.iter().map(|a| a.view()).collect();
        ndarray::concatenate(Axis(axis), &views).expect("concat shapes")
    }
    match xs[0] {
        Value::F(_) => Value::F(cat(xs.iter().map(|v| v.f()).collect(), axis)),
        Value::I(_) => Value::I(cat(xs.iter().map(|v| v.i()).collect(), axis)),
        Value::B(_) => Value::B(cat(xs.iter().map(|v| v.b()).collect(), axis)),
    }
}

pub fn slice_eval(x: &Value, axis: usize, start: usize, end: usize) -> Value {
    x.slice_axis(axis, start, end)
}

pub fn scatter_add_eval(x: &Value, idx: &Value, upd: &Value) -> Value {
    let (mut out, idx, upd) = (x.f().clone(), idx.i(), upd.f());
    let n = out.shape()[0] as i64;
    for (p, &i) in idx.iter().enumerate() {
        let i = if i < 0 { i + n } else { i };
        let mut row = out.index_axis_mut(Axis(0), i.clamp(0, n - 1) as usize);
        row += &upd.index_axis(Axis(0), p);
    }
    Value::F(out)
}

pub fn gather_eval(x: &Value, idx: &Value, axis: usize, out: &TensorType) -> Value {
    let idx = idx.i();
    fn gat<T: Clone + Default>(
        a: &ArrayD<T>,
        idx: &ArrayD<i64>,
        axis: usize,
        out: &[usize],
    ) -> ArrayD<T> {
        if idx.is_empty() {
            return ArrayD::from_elem(IxDyn(out), T::default());
        }
        let n = a.shape()[axis] as i64;
        let picked: Vec<_> = idx
            .iter()
            .map(|&i| {
                let i = if i < 0 { i + n } else { i };
                a.index_axis(Axis(axis), i.clamp(0, n - 1) as usize)
            })
            .collect();
        // Stack the picked slices at `axis`, then split that axis into idx's shape.
        let stacked = ndarray::stack(Axis(axis), &picked).expect("gather stack");
        let v: Vec<T> = stacked.as_standard_layout().iter().cloned().collect();
        ArrayD::from_shape_vec(IxDyn(out), v).unwrap()
    }
    match x {
        Value::F(a) => Value::F(gat(a, idx, axis, &out.shape)),
        Value::I(a) => Value::I(gat(a, idx, axis, &out.shape)),
        Value::B(a) => Value::B(gat(a, idx, axis, &out.shape)),
    }
}

// ---- derivatives ------------------------------------------------------------

pub fn transpose_vjp(g: &mut Graph, perm: &[usize], dy: NodeId) -> NodeId {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    g.transpose(dy, &inv)
}

pub fn concat_vjp(g: &mut Graph, xs: &[NodeId], axis: usize, dy: NodeId) -> Vec<Option<NodeId>> {
    let mut off = 0;
    xs.iter()
        .map(|&x| {
            let n = g.shape(x)[axis];
            let s = g.slice(dy, axis, off, off + n);
            off += n;
            g.dtype(x).is_float().then_some(s)
        })
        .collect()
}

pub fn concat_jvp(g: &mut Graph, op: &Op, xs: &[NodeId], dx: &[Option<NodeId>]) -> NodeId {
    let parts: Vec<NodeId> = xs
        .iter()
        .zip(dx)
        .map(|(&x, d)| d.unwrap_or_else(|| g.zeros_like(x)))
        .collect();
    g.node_with(op.clone(), &parts)
}

pub fn slice_vjp(
    g: &mut Graph,
    x: NodeId,
    axis: usize,
    start: usize,
    end: usize,
    dy: NodeId,
) -> NodeId {
    let xs = g.shape(x).to_vec();
    let mut parts = vec![];
    if start > 0 {
        let mut s = xs.clone();
        s[axis] = start;
        parts.push(g.zeros(&s));
    }
    parts.push(dy);
    if end < xs[axis] {
        let mut s = xs.clone();
        s[axis] = xs[axis] - end;
        parts.push(g.zeros(&s));
    }
    g.concat(&parts, axis)
}

/// Gather's adjoint is a scatter-add, `dX[axis=j] = sum over positions p
/// with idx[p] = j of dY[p]`: the `ScatterAdd` op on `dY` laid out as `[k,
/// rest]` rows (an index-add of `k` rows, where a product with the one-hot
/// matrix of the indices would cost `k x n x rest`).
pub fn gather_vjp(
    g: &mut Graph,
    x: NodeId,
    idx: NodeId,
    axis: usize,
    dy: NodeId,
) -> Option<NodeId> {
    if !g.dtype(x).is_float() {
        return None;
    }
    let xs = g.shape(x).to_vec();
    let is = g.shape(idx).to_vec();
    let n = xs[axis];
    let k = numel(&is);
    let before = &xs[..axis];
    let after = &xs[axis + 1..];
    // dY: before + idx + after  ->  [k, before*after] with idx axes first.
    let mut s = before.to_vec();
    s.push(k);
    s.extend(after);
    let d = g.reshape(dy, &s);
    let mut perm = vec![axis];
    perm.extend((0..s.len()).filter(|&i| i != axis));
    let d = g.transpose(d, &perm);
    let rest = numel(before) * numel(after);
    let d = g.reshape(d, &[k, rest]);
    // Negative indices count from the end, as in the forward op (ONNX
    // semantics); wrapped here, as not every ScatterND takes them.
    let flat_idx = g.reshape(idx, &[k]);
    let zero = g.const_i64(&[], vec![0]);
    let neg = g.less(flat_idx, zero);
    let n_c = g.const_i64(&[], vec![n as i64]);
    let wrapped = g.add(flat_idx, n_c);
    let flat_idx = g.where_(neg, wrapped, flat_idx);
    let zeros = g.zeros(&[n, rest]);
    let dx = g.scatter_add(zeros, flat_idx, d); // [n, rest]
    let mut s2 = vec![n];
    s2.extend(before);
    s2.extend(after);
    let dx = g.reshape(dx, &s2);
    let mut back: Vec<usize> = (1..=axis).collect();
    back.push(0);
    back.extend(axis + 1..s2.len());
    Some(g.transpose(dx, &back))
}
