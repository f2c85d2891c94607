//! Reference interpreter. Floats are evaluated in f64, which makes it the
//! ground truth for finite-difference checks and the engine of constant
//! folding. It favours clarity over speed: the backends are for speed.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::graph::{Graph, NodeId};
use crate::ops::{self, Op};
use crate::types::{DType, Tensor, TensorData, TensorType};

/// A runtime value of the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    F(ArrayD<f64>),
    I(ArrayD<i64>),
    B(ArrayD<bool>),
}

impl Value {
    pub fn from_tensor(t: &Tensor) -> Value {
        let s = IxDyn(&t.shape);
        match &t.data {
            TensorData::F32(v) => {
                Value::F(ArrayD::from_shape_vec(s, v.iter().map(|&x| x as f64).collect()).unwrap())
            }
            TensorData::I64(v) => Value::I(ArrayD::from_shape_vec(s, v.clone()).unwrap()),
            TensorData::Bool(v) => Value::B(ArrayD::from_shape_vec(s, v.clone()).unwrap()),
        }
    }

    /// Round to the tensor's storage precision (f32 for floats).
    pub fn to_tensor(&self) -> Tensor {
        match self {
            Value::F(a) => Tensor::f32(a.shape(), a.iter().map(|&x| x as f32).collect()),
            Value::I(a) => Tensor::i64(a.shape(), a.iter().copied().collect()),
            Value::B(a) => Tensor::bool(a.shape(), a.iter().copied().collect()),
        }
    }

    pub fn fill(value: f64, ty: &TensorType) -> Value {
        let s = IxDyn(&ty.shape);
        match ty.dtype {
            DType::F32 => Value::F(ArrayD::from_elem(s, value as f32 as f64)),
            DType::I64 => Value::I(ArrayD::from_elem(s, value as i64)),
            DType::Bool => Value::B(ArrayD::from_elem(s, value != 0.0)),
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F(a) => a.shape(),
            Value::I(a) => a.shape(),
            Value::B(a) => a.shape(),
        }
    }

    pub fn f(&self) -> &ArrayD<f64> {
        match self {
            Value::F(a) => a,
            _ => panic!("expected a float value"),
        }
    }
    pub fn i(&self) -> &ArrayD<i64> {
        match self {
            Value::I(a) => a,
            _ => panic!("expected an i64 value"),
        }
    }
    pub fn b(&self) -> &ArrayD<bool> {
        match self {
            Value::B(a) => a,
            _ => panic!("expected a bool value"),
        }
    }

    pub fn cast(&self, to: DType) -> Value {
        match (self, to) {
            (Value::F(a), DType::F32) => Value::F(a.mapv(|x| x as f32 as f64)),
            (Value::F(a), DType::I64) => Value::I(a.mapv(|x| x as i64)),
            (Value::F(a), DType::Bool) => Value::B(a.mapv(|x| x != 0.0)),
            (Value::I(a), DType::F32) => Value::F(a.mapv(|x| x as f32 as f64)),
            (Value::I(a), DType::I64) => Value::I(a.clone()),
            (Value::I(a), DType::Bool) => Value::B(a.mapv(|x| x != 0)),
            (Value::B(a), DType::F32) => Value::F(a.mapv(|x| x as u8 as f64)),
            (Value::B(a), DType::I64) => Value::I(a.mapv(|x| x as i64)),
            (Value::B(a), DType::Bool) => Value::B(a.clone()),
        }
    }

    pub fn reshape(&self, shape: &[usize]) -> Value {
        fn r<T: Clone>(a: &ArrayD<T>, s: &[usize]) -> ArrayD<T> {
            let v: Vec<T> = a.iter().cloned().collect();
            ArrayD::from_shape_vec(IxDyn(s), v).expect("reshape size")
        }
        match self {
            Value::F(a) => Value::F(r(a, shape)),
            Value::I(a) => Value::I(r(a, shape)),
            Value::B(a) => Value::B(r(a, shape)),
        }
    }

    pub fn transpose(&self, perm: &[usize]) -> Value {
        match self {
            Value::F(a) => Value::F(
                a.clone()
                    .permuted_axes(IxDyn(perm))
                    .as_standard_layout()
                    .into_owned(),
            ),
            Value::I(a) => Value::I(
                a.clone()
                    .permuted_axes(IxDyn(perm))
                    .as_standard_layout()
                    .into_owned(),
            ),
            Value::B(a) => Value::B(
                a.clone()
                    .permuted_axes(IxDyn(perm))
                    .as_standard_layout()
                    .into_owned(),
            ),
        }
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> Value {
        match self {
            Value::F(a) => Value::F(a.broadcast(IxDyn(shape)).expect("broadcast").to_owned()),
            Value::I(a) => Value::I(a.broadcast(IxDyn(shape)).expect("broadcast").to_owned()),
            Value::B(a) => Value::B(a.broadcast(IxDyn(shape)).expect("broadcast").to_owned()),
        }
    }

    /// Sub-view along one axis, owned.
    pub fn slice_axis(&self, axis: usize, start: usize, end: usize) -> Value {
        let sl = ndarray::Slice::from(start..end);
        match self {
            Value::F(a) => Value::F(a.slice_axis(Axis(axis), sl).to_owned()),
            Value::I(a) => Value::I(a.slice_axis(Axis(axis), sl).to_owned()),
            Value::B(a) => Value::B(a.slice_axis(Axis(axis), sl).to_owned()),
        }
    }
}

/// An error evaluating a graph: a missing or mistyped input.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("missing input '{0}'")]
    MissingInput(String),
    #[error("input '{name}': expected {expected}, got shape {got:?}")]
    BadInput {
        name: String,
        expected: String,
        got: Vec<usize>,
    },
}

/// Evaluate the named outputs of `g` (all outputs when `outputs` is empty).
pub fn eval_graph(
    g: &Graph,
    inputs: &HashMap<String, Value>,
) -> Result<Vec<(String, Value)>, EvalError> {
    let roots: Vec<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let values = eval_nodes(g, inputs, &roots)?;
    Ok(g.outputs()
        .iter()
        .map(|(n, id)| {
            (
                n.clone(),
                values[id.index()].clone().expect("output evaluated"),
            )
        })
        .collect())
}

/// Evaluate the nodes needed for `roots`; returns every computed value by node index.
pub fn eval_nodes(
    g: &Graph,
    inputs: &HashMap<String, Value>,
    roots: &[NodeId],
) -> Result<Vec<Option<Value>>, EvalError> {
    let needed = crate::passes::dce::live_nodes(g, roots);
    let mut vals: Vec<Option<Value>> = vec![None; g.len()];
    for (i, node) in g.nodes().iter().enumerate() {
        if !needed[i] {
            continue;
        }
        let v = match &node.op {
            Op::Input { name } => {
                let v = inputs
                    .get(name)
                    .ok_or_else(|| EvalError::MissingInput(name.clone()))?;
                let dtype_ok = matches!(
                    (v, node.ty.dtype),
                    (Value::F(_), DType::F32)
                        | (Value::I(_), DType::I64)
                        | (Value::B(_), DType::Bool)
                );
                if !dtype_ok || v.shape() != node.ty.shape.as_slice() {
                    return Err(EvalError::BadInput {
                        name: name.clone(),
                        expected: node.ty.to_string(),
                        got: v.shape().to_vec(),
                    });
                }
                v.clone()
            }
            op => {
                let ins: Vec<&Value> = node
                    .inputs
                    .iter()
                    .map(|id| vals[id.index()].as_ref().unwrap())
                    .collect();
                ops::eval(op, &ins, &node.ty)
            }
        };
        vals[i] = Some(v);
    }
    Ok(vals)
}
