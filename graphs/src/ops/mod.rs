//! The op set. One enum, and for every op four rules side by side in its
//! family's module: the shape rule, the reference evaluation, the VJP and the
//! JVP, plus the ONNX lowering in `onnx::export`. Every dispatch below is an
//! exhaustive `match`, so an op added without one of its rules does not compile.

pub mod conv;
pub mod elementwise;
pub mod layout;
pub mod matmul;
pub mod reduce;
pub mod softmax;

use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::types::{DType, Shape, Tensor, TensorType};

pub use conv::ConvParams;

/// Elementwise functions of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Sigmoid,
    Tanh,
    Relu,
    Abs,
    Sign,
    Asinh,
    Erf,
    /// Logical not (bool -> bool).
    Not,
}

/// Elementwise functions of two arguments, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
}

/// Comparisons, with numpy broadcasting, producing bool masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Less,
    Greater,
    Equal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// A primitive operation. Attributes are static; tensors flow through inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A named graph input (data, parameters, state buffers).
    Input {
        name: String,
    },
    /// A constant tensor.
    Const(Tensor),
    /// A tensor of the given type filled with one value (ONNX ConstantOfShape);
    /// autodiff's zeros and ones are these, so they cost no bytes.
    Fill {
        value: f64,
        ty: TensorType,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CompareOp),
    /// `Where(cond, a, b)` with broadcasting.
    Where,
    Cast(DType),
    /// Identity whose derivative is zero.
    StopGradient,
    /// Batched matrix product, numpy semantics, both operands of rank >= 2.
    MatMul,
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    Reshape(Shape),
    Transpose(Vec<usize>),
    Concat {
        axis: usize,
    },
    /// Elements `start..end` (step 1) along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// `Gather(data, indices)` along `axis`: i64 indices in `[-n, n)` for
    /// an axis of length `n`, negatives counting from the end (ONNX
    /// semantics; the VJP wraps them the same way). Out-of-range indices
    /// are an error in ONNX Runtime; the reference interpreter clamps them.
    Gather {
        axis: usize,
    },
    /// `ScatterAdd(data, indices, updates)`: `data` (`[n, ...]`) with row
    /// `updates[p]` added at row `indices[p]` for every `p` (repeated
    /// indices add up): Gather's adjoint along axis 0. `indices` is i64
    /// `[k]` in `[0, n)` (the reference interpreter also wraps negatives
    /// and clamps), `updates` `[k, ...]` with `data`'s trailing shape. ONNX
    /// `ScatterND` with `reduction="add"`.
    ScatterAdd,
    /// Broadcast to a shape (numpy rules).
    Expand(Shape),
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// NCHW input, OIHW weight, no groups.
    Conv2d(ConvParams),
    /// The adjoint of `Conv2d` in its input; weight laid out as the forward
    /// conv's OIHW (so input channels = O).
    ConvTranspose2d {
        params: ConvParams,
        output_padding: [usize; 2],
    },
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 12] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Relu,
        UnaryOp::Abs,
        UnaryOp::Sign,
        UnaryOp::Asinh,
        UnaryOp::Erf,
        UnaryOp::Not,
    ];
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Min,
        BinaryOp::Max,
    ];
}

impl CompareOp {
    pub const ALL: [CompareOp; 3] = [CompareOp::Less, CompareOp::Greater, CompareOp::Equal];
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
}

impl Op {
    /// One op of every kind: each variant, and each sub-op of the unary,
    /// binary, comparison and reduction families (attributes are
    /// placeholders). The op set as a list, for coverage checks such as
    /// the gradient checks' (`tests/tests/gradcheck.rs`).
    pub fn kinds() -> Vec<Op> {
        let t = TensorType::new(DType::F32, &[]);
        let mut v = vec![
            Op::Input { name: "x".into() },
            Op::Const(Tensor::f32(&[], vec![0.0])),
            Op::Fill { value: 0.0, ty: t },
            Op::Where,
            Op::Cast(DType::F32),
            Op::StopGradient,
            Op::MatMul,
            Op::Reshape(vec![]),
            Op::Transpose(vec![]),
            Op::Concat { axis: 0 },
            Op::Slice {
                axis: 0,
                start: 0,
                end: 0,
            },
            Op::Gather { axis: 0 },
            Op::ScatterAdd,
            Op::Expand(vec![]),
            Op::Softmax { axis: 0 },
            Op::LogSoftmax { axis: 0 },
            Op::Conv2d(ConvParams::default()),
            Op::ConvTranspose2d {
                params: ConvParams::default(),
                output_padding: [0, 0],
            },
        ];
        v.extend(UnaryOp::ALL.map(Op::Unary));
        v.extend(BinaryOp::ALL.map(Op::Binary));
        v.extend(CompareOp::ALL.map(Op::Compare));
        v.extend(ReduceOp::ALL.map(|op| Op::Reduce {
            op,
            axes: vec![],
            keepdims: false,
        }));
        for op in &v {
            // No wildcard: an op added to the enum fails to compile here,
            // next to the list it must join.
            match op {
                Op::Input { .. }
                | Op::Const(_)
                | Op::Fill { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Compare(_)
                | Op::Where
                | Op::Cast(_)
                | Op::StopGradient
                | Op::MatMul
                | Op::Reduce { .. }
                | Op::Reshape(_)
                | Op::Transpose(_)
                | Op::Concat { .. }
                | Op::Slice { .. }
                | Op::Gather { .. }
                | Op::ScatterAdd
                | Op::Expand(_)
                | Op::Softmax { .. }
                | Op::LogSoftmax { .. }
                | Op::Conv2d(_)
                | Op::ConvTranspose2d { .. } => {}
            }
        }
        v
    }

    /// Short name used in error messages, `inspect` and op counts.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "Input",
            Op::Const(_) => "Const",
            Op::Fill { .. } => "Fill",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "Neg",
                UnaryOp::Exp => "Exp",
                UnaryOp::Log => "Log",
                UnaryOp::Sqrt => "Sqrt",
                UnaryOp::Sigmoid => "Sigmoid",
                UnaryOp::Tanh => "Tanh",
                UnaryOp::Relu => "Relu",
                UnaryOp::Abs => "Abs",
                UnaryOp::Sign => "Sign",
                UnaryOp::Asinh => "Asinh",
                UnaryOp::Erf => "Erf",
                UnaryOp::Not => "Not",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Min => "Min",
                BinaryOp::Max => "Max",
            },
            Op::Compare(c) => match c {
                CompareOp::Less => "Less",
                CompareOp::Greater => "Greater",
                CompareOp::Equal => "Equal",
            },
            Op::Where => "Where",
            Op::Cast(_) => "Cast",
            Op::StopGradient => "StopGradient",
            Op::MatMul => "MatMul",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "ReduceSum",
                ReduceOp::Mean => "ReduceMean",
                ReduceOp::Max => "ReduceMax",
            },
            Op::Reshape(_) => "Reshape",
            Op::Transpose(_) => "Transpose",
            Op::Concat { .. } => "Concat",
            Op::Slice { .. } => "Slice",
            Op::Gather { .. } => "Gather",
            Op::ScatterAdd => "ScatterAdd",
            Op::Expand(_) => "Expand",
            Op::Softmax { .. } => "Softmax",
            Op::LogSoftmax { .. } => "LogSoftmax",
            Op::Conv2d(_) => "Conv2d",
            Op::ConvTranspose2d { .. } => "ConvTranspose2d",
        }
    }

    /// Number of tensor inputs the op takes (`None` = variadic).
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } | Op::Const(_) | Op::Fill { .. } => Some(0),
            Op::Unary(_)
            | Op::Cast(_)
            | Op::StopGradient
            | Op::Reduce { .. }
            | Op::Reshape(_)
            | Op::Transpose(_)
            | Op::Slice { .. }
            | Op::Expand(_)
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. } => Some(1),
            Op::Binary(_)
            | Op::Compare(_)
            | Op::MatMul
            | Op::Gather { .. }
            | Op::Conv2d(_)
            | Op::ConvTranspose2d { .. } => Some(2),
            Op::Where | Op::ScatterAdd => Some(3),
            Op::Concat { .. } => None,
        }
    }
}

/// The shape rule: the type of the op's output given its inputs' types.
pub fn infer(op: &Op, ins: &[&TensorType]) -> Result<TensorType, String> {
    if let Some(n) = op.arity() {
        if ins.len() != n {
            return Err(format!(
                "{} takes {} inputs, got {}",
                op.name(),
                n,
                ins.len()
            ));
        }
    }
    match op {
        Op::Input { .. } => Err("Input nodes are created with Graph::input".into()),
        Op::Const(t) => Ok(t.ty()),
        Op::Fill { ty, .. } => Ok(ty.clone()),
        Op::Unary(u) => elementwise::unary_shape(*u, ins[0]),
        Op::Binary(_) => elementwise::binary_shape(ins[0], ins[1]),
        Op::Compare(_) => elementwise::compare_shape(ins[0], ins[1]),
        Op::Where => elementwise::where_shape(ins[0], ins[1], ins[2]),
        Op::Cast(to) => Ok(TensorType::new(*to, &ins[0].shape)),
        Op::StopGradient => Ok(ins[0].clone()),
        Op::MatMul => matmul::shape(ins[0], ins[1]),
        Op::Reduce { axes, keepdims, .. } => reduce::shape(ins[0], axes, *keepdims),
        Op::Reshape(s) => layout::reshape_shape(ins[0], s),
        Op::Transpose(p) => layout::transpose_shape(ins[0], p),
        Op::Concat { axis } => layout::concat_shape(ins, *axis),
        Op::Slice { axis, start, end } => layout::slice_shape(ins[0], *axis, *start, *end),
        Op::Gather { axis } => layout::gather_shape(ins[0], ins[1], *axis),
        Op::ScatterAdd => layout::scatter_add_shape(ins[0], ins[1], ins[2]),
        Op::Expand(s) => layout::expand_shape(ins[0], s),
        Op::Softmax { axis } | Op::LogSoftmax { axis } => softmax::shape(ins[0], *axis),
        Op::Conv2d(p) => conv::conv_shape(ins[0], ins[1], p),
        Op::ConvTranspose2d {
            params,
            output_padding,
        } => conv::conv_transpose_shape(ins[0], ins[1], params, *output_padding),
    }
}

/// Reference evaluation (f64 for floats), used by constant folding and by
/// the finite-difference checks.
pub fn eval(op: &Op, ins: &[&Value], out: &TensorType) -> Value {
    match op {
        Op::Input { name } => panic!("input {name} is not evaluated by op rules"),
        Op::Const(t) => Value::from_tensor(t),
        Op::Fill { value, ty } => Value::fill(*value, ty),
        Op::Unary(u) => elementwise::unary_eval(*u, ins[0]),
        Op::Binary(b) => elementwise::binary_eval(*b, ins[0], ins[1], out),
        Op::Compare(c) => elementwise::compare_eval(*c, ins[0], ins[1], out),
        Op::Where => elementwise::where_eval(ins[0], ins[1], ins[2], out),
        Op::Cast(to) => ins[0].cast(*to),
        Op::StopGradient => ins[0].clone(),
        Op::MatMul => matmul::eval(ins[0], ins[1], out),
        Op::Reduce { op, axes, .. } => reduce::eval(*op, ins[0], axes, out),
        Op::Reshape(s) => ins[0].reshape(s),
        Op::Transpose(p) => ins[0].transpose(p),
        Op::Concat { axis } => layout::concat_eval(ins, *axis),
        Op::Slice { axis, start, end } => layout::slice_eval(ins[0], *axis, *start, *end),
        Op::Gather { axis } => layout::gather_eval(ins[0], ins[1], *axis, out),
        Op::ScatterAdd => layout::scatter_add_eval(ins[0], ins[1], ins[2]),
        Op::Expand(s) => ins[0].broadcast_to(s),
        Op::Softmax { axis } => softmax::eval(ins[0], *axis, false),
        Op::LogSoftmax { axis } => softmax::eval(ins[0], *axis, true),
        Op::Conv2d(p) => conv::conv_eval(ins[0], ins[1], p, out),
        Op::ConvTranspose2d { params, .. } => {
            conv::conv_transpose_eval(ins[0], ins[1], params, out)
        }
    }
}

/// The VJP rule: given the output cotangent `dy` of node `y`, the cotangents
/// of its inputs (`None` where the input gets no gradient). Built from the
/// same ops, so it can be differentiated again.
pub fn vjp(g: &mut Graph, y: NodeId, dy: NodeId) -> Vec<Option<NodeId>> {
    let node = g.node(y).clone();
    let x = &node.inputs;
    match &node.op {
        Op::Input { .. } | Op::Const(_) | Op::Fill { .. } => vec![],
        Op::Unary(u) => vec![elementwise::unary_vjp(g, *u, x[0], y, dy)],
        Op::Binary(b) => elementwise::binary_vjp(g, *b, x[0], x[1], y, dy),
        Op::Compare(_) => vec![None, None],
        Op::Where => elementwise::where_vjp(g, x[0], x[1], x[2], dy),
        Op::Cast(_) => vec![elementwise::cast_vjp(g, x[0], dy)],
        Op::StopGradient => vec![None],
        Op::MatMul => matmul::vjp(g, x[0], x[1], dy),
        Op::Reduce { op, axes, keepdims } => {
            vec![Some(reduce::vjp(g, *op, x[0], y, axes, *keepdims, dy))]
        }
        Op::Reshape(_) => {
            let s = g.shape(x[0]).to_vec();
            vec![Some(g.reshape(dy, &s))]
        }
        Op::Transpose(p) => vec![Some(layout::transpose_vjp(g, p, dy))],
        Op::Concat { axis } => layout::concat_vjp(g, x, *axis, dy),
        Op::Slice { axis, start, end } => {
            vec![Some(layout::slice_vjp(g, x[0], *axis, *start, *end, dy))]
        }
        Op::Gather { axis } => vec![layout::gather_vjp(g, x[0], x[1], *axis, dy), None],
        // Linear in data and updates: dy passes to data, and each update's
        // row is read back where it was added.
        Op::ScatterAdd => vec![Some(dy), None, Some(g.gather(dy, x[1], 0))],
        Op::Expand(_) => {
            let s = g.shape(x[0]).to_vec();
            vec![Some(g.sum_to_shape(dy, &s))]
        }
        Op::Softmax { axis } => vec![Some(softmax::softmax_vjp(g, y, *axis, dy))],
        Op::LogSoftmax { axis } => vec![Some(softmax::log_softmax_vjp(g, y, *axis, dy))],
        Op::Conv2d(p) => conv::conv_vjp(g, x[0], x[1], p, dy),
        Op::ConvTranspose2d { params, .. } => conv::conv_transpose_vjp(g, x[0], x[1], params, dy),
    }
}

/// The JVP rule: the output tangent given input tangents (`None` = zero).
/// Returns `None` when the output tangent is zero.
pub fn jvp(g: &mut Graph, y: NodeId, dx: &[Option<NodeId>]) -> Option<NodeId> {
    if dx.iter().all(Option::is_none) {
        return None;
    }
    let node = g.node(y).clone();
    let x = &node.inputs;
    let ty = node.ty.clone();
    match &node.op {
        Op::Input { .. } | Op::Const(_) | Op::Fill { .. } => None,
        Op::Unary(u) => elementwise::unary_jvp(g, *u, x[0], y, dx[0]?),
        Op::Binary(b) => elementwise::binary_jvp(g, *b, x[0], x[1], y, dx[0], dx[1]),
        Op::Compare(_) => None,
        Op::Where => elementwise::where_jvp(g, x[0], dx[1], dx[2], &ty),
        Op::Cast(to) => {
            if to.is_float() && g.ty(x[0]).dtype.is_float() {
                dx[0]
            } else {
                None
            }
        }
        Op::StopGradient => None,
        Op::MatMul => matmul::jvp(g, x[0], x[1], dx[0], dx[1]),
        // Linear ops: the tangent goes through the same op.
        Op::Reduce {
            op: ReduceOp::Sum | ReduceOp::Mean,
            ..
        }
        | Op::Reshape(_)
        | Op::Transpose(_)
        | Op::Slice { .. }
        | Op::Expand(_) => Some(g.node_with(node.op.clone(), &[dx[0]?])),
        Op::Reduce {
            op: ReduceOp::Max,
            axes,
            keepdims,
        } => Some(reduce::max_jvp(g, x[0], y, axes, *keepdims, dx[0]?)),
        Op::Gather { .. } => Some(g.node_with(node.op.clone(), &[dx[0]?, x[1]])),
        Op::ScatterAdd => {
            if dx[0].is_none() && dx[2].is_none() {
                return None;
            }
            let d = dx[0].unwrap_or_else(|| g.zeros(&ty.shape));
            let u = dx[2].unwrap_or_else(|| {
                let s = g.shape(x[2]).to_vec();
                g.zeros(&s)
            });
            Some(g.node_with(Op::ScatterAdd, &[d, x[1], u]))
        }
        Op::Concat { .. } => Some(layout::concat_jvp(g, &node.op, x, dx)),
        Op::Softmax { axis } => Some(softmax::softmax_jvp(g, y, *axis, dx[0]?)),
        Op::LogSoftmax { axis } => Some(softmax::log_softmax_jvp(g, y, *axis, dx[0]?)),
        Op::Conv2d(_) | Op::ConvTranspose2d { .. } => {
            // Bilinear: d(x*w) = dx*w + x*dw.
            let a = dx[0].map(|d| g.node_with(node.op.clone(), &[d, x[1]]));
            let b = dx[1].map(|d| g.node_with(node.op.clone(), &[x[0], d]));
            g.add_opt(a, b)
        }
    }
}
