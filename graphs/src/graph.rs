//! The graph: a flat, topologically ordered list of typed nodes, and the
//! builder API in which models are plain Rust functions.
//!
//! Nodes are only ever appended, and every node's inputs precede it, so the
//! node order is a topological order. Autodiff appends its derivative nodes to
//! the same graph; that is what makes derivatives differentiable again.

use std::fmt;

use crate::ops::{self, BinaryOp, CompareOp, ConvParams, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Shape, Tensor, TensorType};

/// Index of a node in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
}

/// An error building a graph: an op applied to inputs of the wrong types.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{op}: {msg} (inputs: {inputs})")]
    Shape {
        op: &'static str,
        msg: String,
        inputs: String,
    },
    #[error("duplicate graph input name '{0}'")]
    DuplicateInput(String),
    #[error("duplicate graph output name '{0}'")]
    DuplicateOutput(String),
    #[error("graph output name '{0}' is already the name of a graph input")]
    OutputShadowsInput(String),
}

/// A static graph with named inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    nodes: Vec<Node>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    // ---- structure ----------------------------------------------------

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.nodes[id.index()].ty
    }
    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.nodes[id.index()].ty.shape
    }
    pub fn dtype(&self, id: NodeId) -> DType {
        self.nodes[id.index()].ty.dtype
    }
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }
    /// The graph inputs in creation order, with their names.
    pub fn inputs(&self) -> Vec<(String, NodeId)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Input { name } => Some((name.clone(), NodeId(i as u32))),
                _ => None,
            })
            .collect()
    }
    pub fn find_input(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|n| matches!(&n.op, Op::Input { name: m } if m == name))
            .map(|i| NodeId(i as u32))
    }
    pub fn find_output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
    /// The constant value of a node, if it is a constant.
    pub fn const_value(&self, id: NodeId) -> Option<&Tensor> {
        match &self.node(id).op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    /// Replace the whole node list and outputs (used by passes, which rebuild).
    pub(crate) fn from_parts(nodes: Vec<Node>, outputs: Vec<(String, NodeId)>) -> Self {
        Graph { nodes, outputs }
    }

    /// Replace the op of an input node with a constant of the same type (a
    /// parameter that is not differentiated becomes an initializer).
    pub fn freeze_input(&mut self, id: NodeId, value: Tensor) -> Result<(), String> {
        let n = &mut self.nodes[id.index()];
        if !matches!(n.op, Op::Input { .. }) {
            return Err(format!("{id} is not an input"));
        }
        if value.ty() != n.ty {
            return Err(format!(
                "value of type {} for input of type {}",
                value.ty(),
                n.ty
            ));
        }
        n.op = Op::Const(value);
        Ok(())
    }

    /// Turn any node into a named input of the same type, dropping its
    /// operands (which may become dead; run DCE after).
    pub fn replace_with_input(&mut self, id: NodeId, name: &str) -> Result<(), GraphError> {
        if self.find_input(name).is_some() {
            return Err(GraphError::DuplicateInput(name.into()));
        }
        let n = &mut self.nodes[id.index()];
        n.op = Op::Input { name: name.into() };
        n.inputs.clear();
        Ok(())
    }

    /// Turn a constant node into a named input of the same type.
    pub fn promote_to_input(&mut self, id: NodeId, name: &str) -> Result<(), GraphError> {
        if self.find_input(name).is_some() {
            return Err(GraphError::DuplicateInput(name.into()));
        }
        self.nodes[id.index()].op = Op::Input { name: name.into() };
        Ok(())
    }

    // ---- adding nodes ---------------------------------------------------

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> NodeId {
        self.try_input(name, dtype, shape)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_input(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
    ) -> Result<NodeId, GraphError> {
        if self.find_input(name).is_some() {
            return Err(GraphError::DuplicateInput(name.into()));
        }
        Ok(self.push(Node {
            op: Op::Input { name: name.into() },
            inputs: vec![],
            ty: TensorType::new(dtype, shape),
        }))
    }

    pub fn output(&mut self, name: &str, id: NodeId) {
        self.try_output(name, id).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_output(&mut self, name: &str, id: NodeId) -> Result<(), GraphError> {
        if self.find_output(name).is_some() {
            return Err(GraphError::DuplicateOutput(name.into()));
        }
        if self.find_input(name).is_some() {
            return Err(GraphError::OutputShadowsInput(name.into()));
        }
        self.outputs.push((name.into(), id));
        Ok(())
    }

    pub fn set_outputs(&mut self, outputs: Vec<(String, NodeId)>) {
        self.outputs = outputs;
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        NodeId((self.nodes.len() - 1) as u32)
    }

    /// Add a node, inferring its type; a type error names the op and inputs.
    pub fn try_node(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, GraphError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| self.ty(i)).collect();
        let ty = ops::infer(&op, &tys).map_err(|msg| GraphError::Shape {
            op: op.name(),
            msg,
            inputs: tys
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        Ok(self.push(Node {
            op,
            inputs: inputs.to_vec(),
            ty,
        }))
    }

    /// Add a node; a type error is a bug in the model code and panics with
    /// the op and input types.
    pub fn node_with(&mut self, op: Op, inputs: &[NodeId]) -> NodeId {
        self.try_node(op, inputs).unwrap_or_else(|e| panic!("{e}"))
    }

    // ---- builder: constants -------------------------------------------

    pub fn constant(&mut self, t: Tensor) -> NodeId {
        self.node_with(Op::Const(t), &[])
    }
    pub fn scalar(&mut self, v: f32) -> NodeId {
        self.constant(Tensor::scalar_f32(v))
    }
    pub fn const_i64(&mut self, shape: &[usize], v: Vec<i64>) -> NodeId {
        self.constant(Tensor::i64(shape, v))
    }
    pub fn fill(&mut self, value: f64, dtype: DType, shape: &[usize]) -> NodeId {
        self.node_with(
            Op::Fill {
                value,
                ty: TensorType::new(dtype, shape),
            },
            &[],
        )
    }
    pub fn zeros(&mut self, shape: &[usize]) -> NodeId {
        self.fill(0.0, DType::F32, shape)
    }
    pub fn zeros_like(&mut self, x: NodeId) -> NodeId {
        let t = self.ty(x).clone();
        self.fill(0.0, t.dtype, &t.shape)
    }
    pub fn ones_like(&mut self, x: NodeId) -> NodeId {
        let t = self.ty(x).clone();
        self.fill(1.0, t.dtype, &t.shape)
    }

    // ---- builder: elementwise -----------------------------------------

    pub fn unary(&mut self, op: UnaryOp, x: NodeId) -> NodeId {
        self.node_with(Op::Unary(op), &[x])
    }
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
        self.node_with(Op::Binary(op), &[a, b])
    }
    pub fn neg(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Neg, x)
    }
    pub fn exp(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Exp, x)
    }
    pub fn log(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Log, x)
    }
    pub fn sqrt(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Sqrt, x)
    }
    pub fn sigmoid(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Sigmoid, x)
    }
    pub fn tanh(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Tanh, x)
    }
    pub fn relu(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Relu, x)
    }
    pub fn abs(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Abs, x)
    }
    pub fn sign(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Sign, x)
    }
    pub fn asinh(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Asinh, x)
    }
    pub fn erf(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Erf, x)
    }
    pub fn not(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Not, x)
    }
    pub fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn pow(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Pow, a, b)
    }
    pub fn min(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Min, a, b)
    }
    pub fn max(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Max, a, b)
    }
    pub fn square(&mut self, x: NodeId) -> NodeId {
        self.mul(x, x)
    }
    pub fn add_scalar(&mut self, x: NodeId, v: f32) -> NodeId {
        let c = self.scalar(v);
        self.add(x, c)
    }
    pub fn mul_scalar(&mut self, x: NodeId, v: f32) -> NodeId {
        let c = self.scalar(v);
        self.mul(x, c)
    }
    /// Sum of two optional tangents/cotangents (`None` = zero).
    pub fn add_opt(&mut self, a: Option<NodeId>, b: Option<NodeId>) -> Option<NodeId> {
        match (a, b) {
            (Some(a), Some(b)) => Some(self.add(a, b)),
            (a, None) => a,
            (None, b) => b,
        }
    }
    pub fn compare(&mut self, op: CompareOp, a: NodeId, b: NodeId) -> NodeId {
        self.node_with(Op::Compare(op), &[a, b])
    }
    pub fn less(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.compare(CompareOp::Less, a, b)
    }
    pub fn greater(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.compare(CompareOp::Greater, a, b)
    }
    pub fn equal(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.compare(CompareOp::Equal, a, b)
    }
    pub fn where_(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> NodeId {
        self.node_with(Op::Where, &[cond, a, b])
    }
    pub fn cast(&mut self, x: NodeId, to: DType) -> NodeId {
        if self.dtype(x) == to {
            return x;
        }
        self.node_with(Op::Cast(to), &[x])
    }
    pub fn stop_gradient(&mut self, x: NodeId) -> NodeId {
        self.node_with(Op::StopGradient, &[x])
    }

    // ---- builder: linear algebra, reductions ---------------------------

    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.node_with(Op::MatMul, &[a, b])
    }
    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: &[usize], keepdims: bool) -> NodeId {
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        self.node_with(Op::Reduce { op, axes, keepdims }, &[x])
    }
    pub fn sum(&mut self, x: NodeId, axes: &[usize], keepdims: bool) -> NodeId {
        self.reduce(ReduceOp::Sum, x, axes, keepdims)
    }
    pub fn mean(&mut self, x: NodeId, axes: &[usize], keepdims: bool) -> NodeId {
        self.reduce(ReduceOp::Mean, x, axes, keepdims)
    }
    pub fn reduce_max(&mut self, x: NodeId, axes: &[usize], keepdims: bool) -> NodeId {
        self.reduce(ReduceOp::Max, x, axes, keepdims)
    }
    /// Sum of all elements, as a scalar.
    pub fn sum_all(&mut self, x: NodeId) -> NodeId {
        let axes: Vec<usize> = (0..self.shape(x).len()).collect();
        self.sum(x, &axes, false)
    }
    pub fn mean_all(&mut self, x: NodeId) -> NodeId {
        let axes: Vec<usize> = (0..self.shape(x).len()).collect();
        self.mean(x, &axes, false)
    }

    // ---- builder: layout -----------------------------------------------

    pub fn reshape(&mut self, x: NodeId, shape: &[usize]) -> NodeId {
        if self.shape(x) == shape {
            return x;
        }
        self.node_with(Op::Reshape(shape.to_vec()), &[x])
    }
    pub fn transpose(&mut self, x: NodeId, perm: &[usize]) -> NodeId {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return x;
        }
        self.node_with(Op::Transpose(perm.to_vec()), &[x])
    }
    /// Swap the last two axes.
    pub fn transpose_last2(&mut self, x: NodeId) -> NodeId {
        let r = self.shape(x).len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.transpose(x, &perm)
    }
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> NodeId {
        if xs.len() == 1 {
            return xs[0];
        }
        self.node_with(Op::Concat { axis }, xs)
    }
    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> NodeId {
        if start == 0 && self.shape(x).get(axis) == Some(&end) {
            return x;
        }
        self.node_with(Op::Slice { axis, start, end }, &[x])
    }
    /// `x` with row `updates[p]` added at row `indices[p]` (see
    /// [`Op::ScatterAdd`]).
    pub fn scatter_add(&mut self, x: NodeId, indices: NodeId, updates: NodeId) -> NodeId {
        self.node_with(Op::ScatterAdd, &[x, indices, updates])
    }
    pub fn gather(&mut self, x: NodeId, indices: NodeId, axis: usize) -> NodeId {
        self.node_with(Op::Gather { axis }, &[x, indices])
    }
    pub fn expand(&mut self, x: NodeId, shape: &[usize]) -> NodeId {
        if self.shape(x) == shape {
            return x;
        }
        self.node_with(Op::Expand(shape.to_vec()), &[x])
    }
    /// Sum over broadcast axes so that `x` gets `shape` (the adjoint of
    /// broadcasting `shape` up to `x`'s shape).
    pub fn sum_to_shape(&mut self, x: NodeId, shape: &[usize]) -> NodeId {
        let xs = self.shape(x).to_vec();
        if xs == shape {
            return x;
        }
        let lead = xs.len() - shape.len();
        let mut axes: Vec<usize> = (0..lead).collect();
        for (i, &d) in shape.iter().enumerate() {
            if d == 1 && xs[lead + i] != 1 {
                axes.push(lead + i);
            }
        }
        let s = if axes.is_empty() {
            x
        } else {
            self.sum(x, &axes, false)
        };
        self.reshape(s, shape)
    }
    pub fn softmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        self.node_with(Op::Softmax { axis }, &[x])
    }
    pub fn log_softmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        self.node_with(Op::LogSoftmax { axis }, &[x])
    }
    pub fn conv2d(&mut self, x: NodeId, w: NodeId, p: ConvParams) -> NodeId {
        self.node_with(Op::Conv2d(p), &[x, w])
    }

    // ---- builder: composites -------------------------------------------

    /// Mean softmax cross-entropy of `logits[N, C]` against i64 `labels[N]`.
    pub fn softmax_cross_entropy(&mut self, logits: NodeId, labels: NodeId) -> NodeId {
        let s = self.shape(logits).to_vec();
        let (n, c) = (s[0], s[1]);
        let lsm = self.log_softmax(logits, 1);
        let onehot = self.one_hot(labels, c);
        let picked = self.mul(lsm, onehot);
        let total = self.sum_all(picked);
        self.mul_scalar(total, -1.0 / n as f32)
    }

    /// f32 one-hot encoding of i64 `indices` with `depth` classes (new last axis).
    pub fn one_hot(&mut self, indices: NodeId, depth: usize) -> NodeId {
        let mut s = self.shape(indices).to_vec();
        s.push(1);
        let idx = self.reshape(indices, &s);
        let range = self.const_i64(&[depth], (0..depth as i64).collect());
        let eq = self.equal(idx, range);
        self.cast(eq, DType::F32)
    }
}

/// Broadcast two shapes with numpy rules.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Shape, String> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}
