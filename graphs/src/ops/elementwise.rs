//! Elementwise ops: unary functions, broadcasting binary arithmetic,
//! comparisons, `Where` and `Cast`. Shape rule, evaluation, VJP and JVP.

use ndarray::{ArrayD, IxDyn, Zip};

use super::{BinaryOp, CompareOp, UnaryOp};
use crate::eval::Value;
use crate::graph::{broadcast_shapes, Graph, NodeId};
use crate::types::{DType, TensorType};

// ---- shape rules ----------------------------------------------------------

pub fn unary_shape(op: UnaryOp, x: &TensorType) -> Result<TensorType, String> {
    let want = if op == UnaryOp::Not {
        DType::Bool
    } else {
        DType::F32
    };
    let ok = x.dtype == want
        || (matches!(op, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign) && x.dtype == DType::I64);
    if !ok {
        return Err(format!("expects {want}, got {}", x.dtype));
    }
    Ok(x.clone())
}

pub fn binary_shape(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if a.dtype != b.dtype || a.dtype == DType::Bool {
        return Err(format!(
            "operands must share a numeric dtype, got {} and {}",
            a.dtype, b.dtype
        ));
    }
    Ok(TensorType::new(
        a.dtype,
        &broadcast_shapes(&a.shape, &b.shape)?,
    ))
}

pub fn compare_shape(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if a.dtype != b.dtype {
        return Err(format!(
            "operands must share a dtype, got {} and {}",
            a.dtype, b.dtype
        ));
    }
    Ok(TensorType::new(
        DType::Bool,
        &broadcast_shapes(&a.shape, &b.shape)?,
    ))
}

pub fn where_shape(c: &TensorType, a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if c.dtype != DType::Bool {
        return Err(format!("condition must be bool, got {}", c.dtype));
    }
    if a.dtype != b.dtype {
        return Err(format!(
            "branches must share a dtype, got {} and {}",
            a.dtype, b.dtype
        ));
    }
    let s = broadcast_shapes(&c.shape, &broadcast_shapes(&a.shape, &b.shape)?)?;
    Ok(TensorType::new(a.dtype, &s))
}

// ---- evaluation -------------------------------------------------------------

fn unary_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Asinh => x.asinh(),
        UnaryOp::Erf => libm::erf(x),
        UnaryOp::Not => unreachable!("Not is boolean"),
    }
}

pub fn unary_eval(op: UnaryOp, x: &Value) -> Value {
    match (op, x) {
        (UnaryOp::Not, Value::B(a)) => Value::B(a.mapv(|v| !v)),
        (UnaryOp::Neg, Value::I(a)) => Value::I(a.mapv(|v| -v)),
        (UnaryOp::Abs, Value::I(a)) => Value::I(a.mapv(|v| v.abs())),
        (UnaryOp::Sign, Value::I(a)) => Value::I(a.mapv(|v| v.signum())),
        (op, Value::F(a)) => Value::F(a.mapv(|v| unary_f64(op, v))),
        _ => unreachable!("type-checked by unary_shape"),
    }
}

fn zip2<A: Clone, B: Clone, C>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    out: &[usize],
    f: impl Fn(A, B) -> C,
) -> ArrayD<C> {
    let a = a.broadcast(IxDyn(out)).expect("broadcast a");
    let b = b.broadcast(IxDyn(out)).expect("broadcast b");
    Zip::from(&a)
        .and(&b)
        .map_collect(|x, y| f(x.clone(), y.clone()))
}

fn binary_f64(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Pow => a.powf(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Max => a.max(b),
    }
}

fn binary_i64(op: BinaryOp, a: i64, b: i64) -> i64 {
    match op {
        BinaryOp::Add => a.wrapping_add(b),
        BinaryOp::Sub => a.wrapping_sub(b),
        BinaryOp::Mul => a.wrapping_mul(b),
        BinaryOp::Div => a.checked_div(b).unwrap_or(0),
        BinaryOp::Pow => a.wrapping_pow(b.clamp(0, 63) as u32),
        BinaryOp::Min => a.min(b),
        BinaryOp::Max => a.max(b),
    }
}

pub fn binary_eval(op: BinaryOp, a: &Value, b: &Value, out: &TensorType) -> Value {
    match (a, b) {
        (Value::F(a), Value::F(b)) => Value::F(zip2(a, b, &out.shape, |x, y| binary_f64(op, x, y))),
        (Value::I(a), Value::I(b)) => Value::I(zip2(a, b, &out.shape, |x, y| binary_i64(op, x, y))),
        _ => unreachable!("type-checked by binary_shape"),
    }
}

pub fn compare_eval(op: CompareOp, a: &Value, b: &Value, out: &TensorType) -> Value {
    fn cmp<T: PartialOrd + Clone>(
        op: CompareOp,
        a: &ArrayD<T>,
        b: &ArrayD<T>,
        s: &[usize],
    ) -> ArrayD<bool> {
        zip2(a, b, s, |x, y| match op {
            CompareOp::Less => x < y,
            CompareOp::Greater => x > y,
            CompareOp::Equal => x == y,
        })
    }
    Value::B(match (a, b) {
        (Value::F(a), Value::F(b)) => cmp(op, a, b, &out.shape),
        (Value::I(a), Value::I(b)) => cmp(op, a, b, &out.shape),
        (Value::B(a), Value::B(b)) => cmp(op, a, b, &out.shape),
        _ => unreachable!("type-checked by compare_shape"),
    })
}

pub fn where_eval(c: &Value, a: &Value, b: &Value, out: &TensorType) -> Value {
    let s = IxDyn(&out.shape);
    let c = c.b().broadcast(s.clone()).expect("broadcast cond");
    fn sel<T: Clone>(
        c: &ndarray::ArrayViewD<bool>,
        a: &ArrayD<T>,
        b: &ArrayD<T>,
        s: &IxDyn,
    ) -> ArrayD<T> {
        let a = a.broadcast(s.clone()).expect("broadcast a");
        let b = b.broadcast(s.clone()).expect("broadcast b");
        Zip::from(c)
            .and(&a)
            .and(&b)
            .map_collect(|&c, x, y| if c { x.clone() } else { y.clone() })
    }
    match (a, b) {
        (Value::F(a), Value::F(b)) => Value::F(sel(&c, a, b, &s)),
        (Value::I(a), Value::I(b)) => Value::I(sel(&c, a, b, &s)),
        (Value::B(a), Value::B(b)) => Value::B(sel(&c, a, b, &s)),
        _ => unreachable!("type-checked by where_shape"),
    }
}

// ---- derivatives ------------------------------------------------------------

/// f'(x) * t for the float unary ops; `None` where the derivative is zero.
/// For elementwise functions the VJP and the JVP are the same product.
fn unary_deriv_times(
    g: &mut Graph,
    op: UnaryOp,
    x: NodeId,
    y: NodeId,
    t: NodeId,
) -> Option<NodeId> {
    Some(match op {
        UnaryOp::Neg => g.neg(t),
        UnaryOp::Exp => g.mul(t, y),
        UnaryOp::Log => g.div(t, x),
        UnaryOp::Sqrt => {
            let two_y = g.mul_scalar(y, 2.0);
            g.div(t, two_y)
        }
        UnaryOp::Sigmoid => {
            let one = g.scalar(1.0);
            let om = g.sub(one, y);
            let d = g.mul(y, om);
            g.mul(t, d)
        }
        UnaryOp::Tanh => {
            let one = g.scalar(1.0);
            let y2 = g.mul(y, y);
            let d = g.sub(one, y2);
            g.mul(t, d)
        }
        UnaryOp::Relu => {
            let zero = g.scalar(0.0);
            let pos = g.greater(x, zero);
            let mask = g.cast(pos, DType::F32);
            g.mul(t, mask)
        }
        UnaryOp::Abs => {
            let s = g.sign(x);
            g.mul(t, s)
        }
        UnaryOp::Sign | UnaryOp::Not => return None,
        UnaryOp::Asinh => {
            let x2 = g.mul(x, x);
            let x2p1 = g.add_scalar(x2, 1.0);
            let d = g.sqrt(x2p1);
            g.div(t, d)
        }
        UnaryOp::Erf => {
            let x2 = g.mul(x, x);
            let nx2 = g.neg(x2);
            let e = g.exp(nx2);
            let d = g.mul_scalar(e, std::f32::consts::FRAC_2_SQRT_PI);
            g.mul(t, d)
        }
    })
}

pub fn unary_vjp(g: &mut Graph, op: UnaryOp, x: NodeId, y: NodeId, dy: NodeId) -> Option<NodeId> {
    if !g.dtype(x).is_float() {
        return None;
    }
    unary_deriv_times(g, op, x, y, dy)
}

pub fn unary_jvp(g: &mut Graph, op: UnaryOp, x: NodeId, y: NodeId, dx: NodeId) -> Option<NodeId> {
    if !g.dtype(x).is_float() {
        return None;
    }
    unary_deriv_times(g, op, x, y, dx)
}

/// `cond` for the argument-selecting ops: true where `b` is the one chosen.
fn picks_b(g: &mut Graph, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
    match op {
        BinaryOp::Min => g.less(b, a),
        BinaryOp::Max => g.less(a, b),
        _ => unreachable!(),
    }
}

/// `d y / d a * d` (`arg` 0) or `d y / d b * d` (`arg` 1) for `y = op(a, b)`,
/// elementwise, before any reduction over broadcast axes: the partials the
/// VJP (with `d` the output's cotangent) and the JVP (with `d` the
/// argument's tangent) both multiply by, written once.
fn binary_partial_times(
    g: &mut Graph,
    op: BinaryOp,
    (a, b, y): (NodeId, NodeId, NodeId),
    arg: usize,
    d: NodeId,
) -> NodeId {
    match (op, arg) {
        (BinaryOp::Add, _) | (BinaryOp::Sub, 0) => d,
        (BinaryOp::Sub, _) => g.neg(d),
        (BinaryOp::Mul, 0) => g.mul(d, b),
        (BinaryOp::Mul, _) => g.mul(d, a),
        (BinaryOp::Div, 0) => g.div(d, b),
        // d/db a/b = -(a/b)/b = -y/b
        (BinaryOp::Div, _) => {
            let q = g.div(d, b);
            let t = g.mul(q, y);
            g.neg(t)
        }
        // d/da a^b = b a^(b-1)
        (BinaryOp::Pow, 0) => {
            let one = g.scalar(1.0);
            let bm1 = g.sub(b, one);
            let p = g.pow(a, bm1);
            let pb = g.mul(p, b);
            g.mul(d, pb)
        }
        // d/db a^b = a^b ln a
        (BinaryOp::Pow, _) => {
            let la = g.log(a);
            let yl = g.mul(y, la);
            g.mul(d, yl)
        }
        // The chosen argument takes the whole derivative.
        (BinaryOp::Min | BinaryOp::Max, _) => {
            let c = picks_b(g, op, a, b);
            let zero = g.scalar(0.0);
            if arg == 0 {
                g.where_(c, zero, d)
            } else {
                g.where_(c, d, zero)
            }
        }
    }
}

pub fn binary_vjp(
    g: &mut Graph,
    op: BinaryOp,
    a: NodeId,
    b: NodeId,
    y: NodeId,
    dy: NodeId,
) -> Vec<Option<NodeId>> {
    if !g.dtype(a).is_float() {
        return vec![None, None];
    }
    let da = binary_partial_times(g, op, (a, b, y), 0, dy);
    let db = binary_partial_times(g, op, (a, b, y), 1, dy);
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    vec![Some(g.sum_to_shape(da, &sa)), Some(g.sum_to_shape(db, &sb))]
}

pub fn binary_jvp(
    g: &mut Graph,
    op: BinaryOp,
    a: NodeId,
    b: NodeId,
    y: NodeId,
    da: Option<NodeId>,
    db: Option<NodeId>,
) -> Option<NodeId> {
    if !g.dtype(a).is_float() {
        return None;
    }
    let l = da.map(|d| binary_partial_times(g, op, (a, b, y), 0, d));
    let r = db.map(|d| binary_partial_times(g, op, (a, b, y), 1, d));
    let t = g.add_opt(l, r)?;
    let out = g.shape(y).to_vec();
    Some(g.expand(t, &out))
}

pub fn where_vjp(
    g: &mut Graph,
    c: NodeId,
    a: NodeId,
    b: NodeId,
    dy: NodeId,
) -> Vec<Option<NodeId>> {
    if !g.dtype(a).is_float() {
        return vec![None, None, None];
    }
    let zero = g.scalar(0.0);
    let da = g.where_(c, dy, zero);
    let db = g.where_(c, zero, dy);
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    vec![
        None,
        Some(g.sum_to_shape(da, &sa)),
        Some(g.sum_to_shape(db, &sb)),
    ]
}

pub fn where_jvp(
    g: &mut Graph,
    c: NodeId,
    da: Option<NodeId>,
    db: Option<NodeId>,
    out: &TensorType,
) -> Option<NodeId> {
    if !out.dtype.is_float() {
        return None;
    }
    let zero = g.scalar(0.0);
    let t = g.where_(c, da.unwrap_or(zero), db.unwrap_or(zero));
    Some(g.expand(t, &out.shape))
}

pub fn cast_vjp(g: &mut Graph, x: NodeId, dy: NodeId) -> Option<NodeId> {
    if g.dtype(x).is_float() && g.dtype(dy).is_float() {
        Some(dy)
    } else {
        None
    }
}
