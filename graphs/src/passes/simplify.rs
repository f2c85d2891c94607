//! Algebraic simplification, aimed at what autodiff produces: symbolic
//! zeros and ones (`Fill`), multiplications by them, layout ops on them,
//! and chains of reshapes and transposes.

use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::ops::{self, BinaryOp, Op, ReduceOp, UnaryOp};
use crate::types::{numel, TensorData, TensorType};

pub enum Simplified {
    /// The node equals an existing node of the same type.
    Alias(NodeId),
    /// The node equals this op applied to these inputs (simplified again).
    Replace(Op, Vec<NodeId>),
    Keep,
}

/// The single value of a node whose elements are all equal, if known cheaply.
fn uniform(g: &Graph, id: NodeId) -> Option<f64> {
    match &g.node(id).op {
        Op::Fill { value, .. } => Some(*value),
        Op::Const(t) if t.numel() <= 4096 && t.numel() > 0 => match &t.data {
            TensorData::F32(v) => v
                .iter()
                .all(|&x| x.to_bits() == v[0].to_bits())
                .then_some(v[0] as f64),
            _ => None,
        },
        _ => None,
    }
}

fn fill(value: f64, ty: &TensorType) -> Simplified {
    Simplified::Replace(
        Op::Fill {
            value,
            ty: ty.clone(),
        },
        vec![],
    )
}

/// `x`, broadcast to the output type if it is smaller.
fn as_output(g: &Graph, x: NodeId, ty: &TensorType) -> Simplified {
    if g.ty(x) == ty {
        Simplified::Alias(x)
    } else {
        Simplified::Replace(Op::Expand(ty.shape.clone()), vec![x])
    }
}

pub fn simplify(g: &mut Graph, op: &Op, ins: &[NodeId], ty: &TensorType) -> Simplified {
    let u: Vec<Option<f64>> = ins.iter().map(|&i| uniform(g, i)).collect();
    let is_fill = |g: &Graph, i: NodeId| matches!(g.node(i).op, Op::Fill { .. });
    match op {
        Op::Binary(b) => {
            let (a, c) = (ins[0], ins[1]);
            if *b == BinaryOp::Add {
                if let Some(r) = merge_disjoint_concats(g, a, c, ty) {
                    return r;
                }
            }
            match (b, u[0], u[1]) {
                (BinaryOp::Add, Some(0.0), _) => return as_output(g, c, ty),
                (BinaryOp::Add | BinaryOp::Sub, _, Some(0.0)) => return as_output(g, a, ty),
                (BinaryOp::Sub, Some(z), _) if z == 0.0 && g.ty(c) == ty => {
                    return Simplified::Replace(Op::Unary(UnaryOp::Neg), vec![c]);
                }
                (BinaryOp::Mul, Some(z), _) | (BinaryOp::Mul, _, Some(z))
                    if z == 0.0 && is_finite_mul(g, ins) =>
                {
                    return fill(0.0, ty)
                }
                (BinaryOp::Mul, Some(1.0), _) => return as_output(g, c, ty),
                (BinaryOp::Mul | BinaryOp::Div, _, Some(1.0)) => return as_output(g, a, ty),
                (BinaryOp::Mul, Some(m), _) if m == -1.0 && g.ty(c) == ty => {
                    return Simplified::Replace(Op::Unary(UnaryOp::Neg), vec![c]);
                }
                (BinaryOp::Mul, _, Some(m)) if m == -1.0 && g.ty(a) == ty => {
                    return Simplified::Replace(Op::Unary(UnaryOp::Neg), vec![a]);
                }
                _ => {}
            }
        }
        Op::Unary(UnaryOp::Neg) => {
            if let Op::Unary(UnaryOp::Neg) = g.node(ins[0]).op {
                return Simplified::Alias(g.node(ins[0]).inputs[0]);
            }
        }
        Op::MatMul | Op::Conv2d(_) | Op::ConvTranspose2d { .. } if u.contains(&Some(0.0)) => {
            return fill(0.0, ty)
        }
        Op::Reshape(_)
        | Op::Transpose(_)
        | Op::Expand(_)
        | Op::Slice { .. }
        | Op::Gather { .. } => {
            if let Some(v) = u[0].filter(|_| is_fill(g, ins[0])) {
                return fill(v, ty);
            }
            match (op, &g.node(ins[0]).op) {
                (Op::Reshape(_), Op::Reshape(_)) => {
                    let inner = g.node(ins[0]).inputs[0];
                    return if g.shape(inner) == ty.shape.as_slice() {
                        Simplified::Alias(inner)
                    } else {
                        Simplified::Replace(op.clone(), vec![inner])
                    };
                }
                (Op::Transpose(p2), Op::Transpose(p1)) => {
                    let inner = g.node(ins[0]).inputs[0];
                    let p: Vec<usize> = p2.iter().map(|&i| p1[i]).collect();
                    return if p.iter().enumerate().all(|(i, &j)| i == j) {
                        Simplified::Alias(inner)
                    } else {
                        Simplified::Replace(Op::Transpose(p), vec![inner])
                    };
                }
                _ => {}
            }
        }
        Op::Reduce { op: r, axes, .. } => {
            if let Some(v) = u[0].filter(|_| is_fill(g, ins[0])) {
                let n: usize = axes.iter().map(|&a| g.shape(ins[0])[a]).product();
                return fill(if *r == ReduceOp::Sum { v * n as f64 } else { v }, ty);
            }
        }
        Op::Concat { .. } if ins.iter().all(|&i| is_fill(g, i)) && u.iter().all(|v| *v == u[0]) => {
            return fill(u[0].unwrap(), ty);
        }
        Op::Where => {
            if let (Some(a), Some(b)) = (u[1], u[2]) {
                if a.to_bits() == b.to_bits() && is_fill(g, ins[1]) {
                    return fill(a, ty);
                }
            }
            if let Op::Fill { value, .. } = g.node(ins[0]).op {
                let pick = if value != 0.0 { ins[1] } else { ins[2] };
                return as_output(g, pick, ty);
            }
        }
        Op::Cast(to) if g.dtype(ins[0]) == *to => return Simplified::Alias(ins[0]),
        _ => {}
    }
    // Elementwise ops on filled inputs give a filled output.
    let elementwise = matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Cast(_)
    );
    if elementwise && !ins.is_empty() && ins.iter().all(|&i| is_fill(g, i)) {
        let vals: Vec<Value> = ins
            .iter()
            .map(|&i| Value::fill(u_of(g, i), &TensorType::new(g.dtype(i), &[])))
            .collect();
        let refs: Vec<&Value> = vals.iter().collect();
        let v = ops::eval(op, &refs, &TensorType::new(ty.dtype, &[]));
        let x = match v {
            Value::F(a) => a.first().copied().unwrap_or(0.0),
            Value::I(a) => a.first().map(|&x| x as f64).unwrap_or(0.0),
            Value::B(a) => a.first().map(|&x| x as u8 as f64).unwrap_or(0.0),
        };
        debug_assert_eq!(numel(&ty.shape), ty.numel());
        return fill(x, ty);
    }
    Simplified::Keep
}

/// `Concat(.., x, ..) + Concat(.., y, ..)` along one axis where at every
/// position at most one side is not a zero fill: one Concat of the non-zero
/// parts, with zero fills in the gaps. This is what the adjoints of several
/// slices of one tensor sum to (each slice's VJP pads its piece with zeros):
/// one copy instead of full-size padded tensors added pairwise.
fn merge_disjoint_concats(
    g: &mut Graph,
    a: NodeId,
    b: NodeId,
    ty: &TensorType,
) -> Option<Simplified> {
    let axis = match (&g.node(a).op, &g.node(b).op) {
        (Op::Concat { axis: x }, Op::Concat { axis: y }) if x == y => *x,
        _ => return None,
    };
    if g.ty(a) != ty || g.ty(b) != ty {
        return None;
    }
    // (start, length, node) of the parts that are not zero fills.
    let nonzero = |g: &Graph, n: NodeId| -> Vec<(usize, usize, NodeId)> {
        let mut off = 0;
        let mut v = vec![];
        for &p in &g.node(n).inputs {
            let len = g.shape(p)[axis];
            let zero = matches!(g.node(p).op, Op::Fill { value, .. } if value == 0.0);
            if !zero {
                v.push((off, len, p));
            }
            off += len;
        }
        v
    };
    let mut parts = nonzero(g, a);
    parts.extend(nonzero(g, b));
    parts.sort_by_key(|p| p.0);
    if parts.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return None;
    }
    let zeros = |g: &mut Graph, len: usize| {
        let mut s = ty.shape.clone();
        s[axis] = len;
        g.fill(0.0, ty.dtype, &s)
    };
    let mut out = vec![];
    let mut pos = 0;
    for (start, len, p) in parts {
        if start > pos {
            out.push(zeros(g, start - pos));
        }
        out.push(p);
        pos = start + len;
    }
    if pos < ty.shape[axis] {
        out.push(zeros(g, ty.shape[axis] - pos));
    }
    Some(if out.len() == 1 {
        Simplified::Alias(out[0])
    } else {
        Simplified::Replace(Op::Concat { axis }, out)
    })
}

fn u_of(g: &Graph, i: NodeId) -> f64 {
    match g.node(i).op {
        Op::Fill { value, .. } => value,
        _ => unreachable!(),
    }
}

/// `0 * x = 0` is only an identity when x is finite; autodiff's zeros meet
/// finite values, but we keep `0 * c` for non-finite constants c.
fn is_finite_mul(g: &Graph, ins: &[NodeId]) -> bool {
    ins.iter().all(|&i| match &g.node(i).op {
        Op::Const(t) => t.as_f32().is_none_or(|v| v.iter().all(|x| x.is_finite())),
        Op::Fill { value, .. } => value.is_finite(),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use crate::autodiff::grad;
    use crate::eval::{eval_graph, Value};
    use crate::graph::Graph;
    use crate::ops::{BinaryOp, Op};
    use crate::passes::optimize;
    use crate::types::{DType, Tensor};

    /// The gradient of a function of three slices of one tensor is one
    /// Concat of the slices' adjoints, not padded pieces summed by Add, and
    /// has the right value.
    #[test]
    fn slice_adjoints_merge_into_one_concat() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[6, 3]);
        let a = g.slice(x, 0, 0, 2);
        let b = g.slice(x, 0, 2, 3);
        let c = g.slice(x, 0, 4, 6);
        let (a2, b2, c2) = (g.square(a), g.square(b), g.square(c));
        let (b3, c4) = (g.mul_scalar(b2, 3.0), g.mul_scalar(c2, 4.0));
        let s = [a2, b3, c4].map(|t| g.sum_all(t));
        let l = g.add(s[0], s[1]);
        let l = g.add(l, s[2]);
        let dx = grad(&mut g, l, &[x])[0];
        g.set_outputs(vec![("dx".into(), dx)]);
        let o = optimize(&g);
        let adds_of_concats = o
            .nodes()
            .iter()
            .filter(|n| {
                matches!(n.op, Op::Binary(BinaryOp::Add))
                    && n.inputs
                        .iter()
                        .all(|&i| matches!(o.node(i).op, Op::Concat { .. }))
            })
            .count();
        assert_eq!(adds_of_concats, 0);
        let xv: Vec<f32> = (0..18).map(|i| i as f32).collect();
        let feeds = [(
            "x".to_string(),
            Value::from_tensor(&Tensor::f32(&[6, 3], xv.clone())),
        )]
        .into_iter()
        .collect();
        let out = eval_graph(&o, &feeds).unwrap();
        let got: Vec<f64> = out[0].1.f().iter().copied().collect();
        let want: Vec<f64> = (0..18)
            .map(|i| match i / 3 {
                0 | 1 => 2.0 * xv[i] as f64,
                2 => 6.0 * xv[i] as f64,
                3 => 0.0,
                _ => 8.0 * xv[i] as f64,
            })
            .collect();
        assert_eq!(got, want);
    }
}
