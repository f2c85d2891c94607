//! Import of ONNX inference graphs into the IR.
//!
//! The importer reads a standard-domain ONNX model with static shapes and
//! rebuilds it from IR ops. Float initializers are the model's parameters and
//! become named `Input` nodes; every other initializer, every `Constant` and
//! every node whose inputs are all constant is a `Const` (nodes are folded as
//! they are imported, so shape computations such as `Shape -> Gather ->
//! Concat -> Reshape` resolve to constants). Many ONNX ops are composites of
//! IR ops (Gemm, LayerNormalization, SoftmaxCrossEntropyLoss, ...). Only the
//! nodes the graph outputs depend on are imported.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use prost::Message;

use super::pb::{
    self, tensor_shape_proto::dimension, type_proto, AttributeProto, NodeProto, TensorProto,
};
use crate::eval::Value;
use crate::graph::{broadcast_shapes, Graph, NodeId};
use crate::ops::{self, BinaryOp, CompareOp, ConvParams, Op, ReduceOp, UnaryOp};
use crate::types::{numel, DType, Tensor, TensorData, TensorType};

/// An imported model. Float initializers are the model's parameters: they
/// appear in `graph` as `Input` nodes named like the initializer, and their
/// values are in `initializers`.
#[derive(Debug)]
pub struct ImportedModel {
    pub graph: Graph,
    /// Values of the float initializers (the parameters), in file order.
    pub initializers: Vec<(String, Tensor)>,
    /// The model's own graph inputs (not initializers), in file order.
    pub data_inputs: Vec<String>,
    /// The default-domain opset the model declares.
    pub opset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: not an ONNX model ({reason})")]
    NotOnnx { file: String, reason: String },
    #[error("{file}: unsupported op '{op}' at node '{node}'")]
    UnsupportedOp {
        file: String,
        op: String,
        node: String,
    },
    #[error("{file}: node '{node}' ({op}): {msg}")]
    Invalid {
        file: String,
        node: String,
        op: String,
        msg: String,
    },
    #[error("{file}: {msg}")]
    Model { file: String, msg: String },
}

pub fn import_file(path: &Path) -> Result<ImportedModel, ImportError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImportError::NotOnnx {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    import_bytes(&bytes, &file)
}

/// Import an ONNX model from its serialised bytes; `source` names the model
/// in error messages (usually its path).
pub fn import_bytes(bytes: &[u8], source: &str) -> Result<ImportedModel, ImportError> {
    let not_onnx = |reason: String| ImportError::NotOnnx {
        file: source.into(),
        reason,
    };
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| not_onnx(format!("protobuf decoding failed: {e}")))?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(not_onnx("the file decodes but holds no graph".into()));
    };
    let model_err = |msg: String| ImportError::Model {
        file: source.into(),
        msg,
    };
    let opset = model
        .opset_import
        .iter()
        .find(|o| is_default_domain(&o.domain))
        .map(|o| o.version)
        .ok_or_else(|| model_err("the model imports no default-domain (ai.onnx) opset".into()))?;
    if opset < MIN_OPSET {
        return Err(model_err(format!(
            "opset {opset} is too old (metac imports opset {MIN_OPSET} and later; upgrade it with onnx.version_converter)"
        )));
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(model_err("sparse initializers are not supported".into()));
    }

    let mut imp = Importer {
        file: source,
        opset,
        g: Graph::new(),
        env: HashMap::new(),
    };

    // Data inputs first (graph inputs that are not initializers), then the
    // initializers in file order.
    let init_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut data_inputs = vec![];
    for vi in &graph.input {
        if init_names.contains(vi.name.as_str()) {
            continue;
        }
        let (dtype, shape) =
            input_type(vi).map_err(|m| model_err(format!("graph input '{}': {m}", vi.name)))?;
        let id = imp
            .g
            .try_input(&vi.name, dtype, &shape)
            .map_err(|e| model_err(format!("graph input '{}': {e}", vi.name)))?;
        imp.define(&vi.name, id).map_err(model_err)?;
        data_inputs.push(vi.name.clone());
    }
    let mut initializers = vec![];
    for t in &graph.initializer {
        let value =
            decode_tensor(t).map_err(|m| model_err(format!("initializer '{}': {m}", t.name)))?;
        let id = if value.dtype() == DType::F32 {
            let id = imp
                .g
                .try_input(&t.name, DType::F32, &value.shape)
                .map_err(|e| model_err(format!("initializer '{}': {e}", t.name)))?;
            initializers.push((t.name.clone(), value));
            id
        } else {
            imp.g.constant(value)
        };
        imp.define(&t.name, id).map_err(model_err)?;
    }

    // Only the nodes the outputs depend on.
    let mut needed: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut live = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o.as_str())) {
            live[i] = true;
            needed.extend(
                node.input
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.as_str()),
            );
        }
    }
    for (node, _) in graph.node.iter().zip(&live).filter(|(_, l)| **l) {
        imp.import_node(node)?;
    }

    for o in &graph.output {
        let id = *imp.env.get(&o.name).ok_or_else(|| {
            model_err(format!(
                "graph output '{}' is not computed by any node",
                o.name
            ))
        })?;
        check_declared(o, imp.g.ty(id))
            .map_err(|m| model_err(format!("graph output '{}': {m}", o.name)))?;
        imp.g
            .try_output(&o.name, id)
            .map_err(|e| model_err(format!("graph output '{}': {e}", o.name)))?;
    }
    Ok(ImportedModel {
        graph: imp.g,
        initializers,
        data_inputs,
        opset,
    })
}

const MIN_OPSET: i64 = 7;

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

// ---- ONNX types and tensors -------------------------------------------------

const ONNX_FLOAT: i32 = 1;
const ONNX_INT32: i32 = 6;
const ONNX_INT64: i32 = 7;
const ONNX_BOOL: i32 = 9;

fn onnx_dtype_name(t: i32) -> String {
    let s = match t {
        0 => "undefined",
        1 => "float",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "double",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        _ => return format!("type code {t}"),
    };
    s.into()
}

fn unsupported_dtype(t: i32) -> String {
    let hint = match t {
        10 | 11 | 16 => " (metac computes in float32: convert the model to float32 first)",
        _ => "",
    };
    format!(
        "element type {} is not supported (float, int64 and bool are; int32 is read as int64){hint}",
        onnx_dtype_name(t)
    )
}

/// The IR dtype of an ONNX element type (int32 is widened to int64).
fn ir_dtype(t: i32) -> Result<DType, String> {
    match t {
        ONNX_FLOAT => Ok(DType::F32),
        ONNX_INT64 | ONNX_INT32 => Ok(DType::I64),
        ONNX_BOOL => Ok(DType::Bool),
        _ => Err(unsupported_dtype(t)),
    }
}

/// The dtype and static shape of a graph input.
fn input_type(vi: &pb::ValueInfoProto) -> Result<(DType, Vec<usize>), String> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err("not a tensor (sequences, maps and optionals are not supported)".into());
    };
    let dtype = match t.elem_type {
        ONNX_FLOAT => DType::F32,
        ONNX_INT64 => DType::I64,
        ONNX_BOOL => DType::Bool,
        other => return Err(unsupported_dtype(other).replace("; int32 is read as int64", "")),
    };
    let Some(shape) = t.shape.as_ref() else {
        return Err("has no shape; metac needs static shapes".into());
    };
    let mut dims = vec![];
    for (axis, d) in shape.dim.iter().enumerate() {
        match &d.value {
            Some(dimension::Value::DimValue(v)) if *v >= 0 => dims.push(*v as usize),
            Some(dimension::Value::DimValue(v)) => return Err(format!("axis {axis} has negative size {v}")),
            Some(dimension::Value::DimParam(p)) => {
                return Err(format!(
                    "axis {axis} is dynamic ('{p}'); metac needs static shapes: export without dynamic axes \
                     or fix the dimension (e.g. onnxruntime.tools.make_dynamic_shape_fixed)"
                ))
            }
            None => {
                return Err(format!(
                    "axis {axis} has no size; metac needs static shapes: export without dynamic axes"
                ))
            }
        }
    }
    Ok((dtype, dims))
}

/// Check a graph output's declared type (where it declares one) against the
/// imported node's type.
fn check_declared(vi: &pb::ValueInfoProto, got: &TensorType) -> Result<(), String> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Ok(());
    };
    if t.elem_type != 0 {
        if let Ok(d) = ir_dtype(t.elem_type) {
            if d != got.dtype {
                return Err(format!(
                    "declared {} but the graph computes {}",
                    onnx_dtype_name(t.elem_type),
                    got
                ));
            }
        }
    }
    if let Some(s) = &t.shape {
        let mismatch = s.dim.len() != got.rank()
            || s.dim.iter().zip(&got.shape).any(
                |(d, &g)| matches!(d.value, Some(dimension::Value::DimValue(v)) if v != g as i64),
            );
        if mismatch {
            return Err(format!(
                "declared shape {} but the graph computes {}",
                show_dims(s),
                got
            ));
        }
    }
    Ok(())
}

fn show_dims(s: &pb::TensorShapeProto) -> String {
    let d: Vec<String> = s
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(v)) => v.to_string(),
            Some(dimension::Value::DimParam(p)) => p.clone(),
            None => "?".into(),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

/// Decode a tensor (raw little-endian data or the typed fields).
fn decode_tensor(t: &TensorProto) -> Result<Tensor, String> {
    if !t.external_data.is_empty()
        || t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
    {
        return Err(
            "its data is stored externally, which is not supported; save the model with the data \
                    embedded (onnx.save_model(m, path, save_as_external_data=False))"
                .into(),
        );
    }
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let mut shape = vec![];
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d}"));
        }
        shape.push(d as usize);
    }
    let n = numel(&shape);
    let raw = &t.raw_data;
    let from_raw = !raw.is_empty();
    let check_len = |len: usize| -> Result<(), String> {
        if len != n {
            return Err(format!(
                "holds {len} values for shape {shape:?} ({n} elements)"
            ));
        }
        Ok(())
    };
    let raw_chunks = |w: usize| -> Result<std::slice::ChunksExact<'_, u8>, String> {
        if raw.len() != n * w {
            return Err(format!(
                "raw_data has {} bytes, expected {} for shape {shape:?}",
                raw.len(),
                n * w
            ));
        }
        Ok(raw.chunks_exact(w))
    };
    match t.data_type {
        ONNX_FLOAT => {
            let v: Vec<f32> = if from_raw {
                raw_chunks(4)?
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            } else {
                t.float_data.clone()
            };
            check_len(v.len())?;
            Ok(Tensor::f32(&shape, v))
        }
        ONNX_INT64 => {
            let v: Vec<i64> = if from_raw {
                raw_chunks(8)?
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            } else {
                t.int64_data.clone()
            };
            check_len(v.len())?;
            Ok(Tensor::i64(&shape, v))
        }
        ONNX_INT32 => {
            let v: Vec<i64> = if from_raw {
                raw_chunks(4)?
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect()
            } else {
                t.int32_data.iter().map(|&x| x as i64).collect()
            };
            check_len(v.len())?;
            Ok(Tensor::i64(&shape, v))
        }
        ONNX_BOOL => {
            let v: Vec<bool> = if from_raw {
                raw_chunks(1)?.map(|c| c[0] != 0).collect()
            } else {
                t.int32_data.iter().map(|&x| x != 0).collect()
            };
            check_len(v.len())?;
            Ok(Tensor::bool(&shape, v))
        }
        other => Err(unsupported_dtype(other)),
    }
}

/// Decode the value of a `Constant` node. Besides the initializer types,
/// double constants are read as float32: exporters emit them for scalars
/// that are then cast to float (`Constant(double) -> Cast(to=float)`), and
/// since double inputs, initializers and casts are rejected, a double
/// constant can only reach the graph through such a cast.
fn decode_constant(t: &TensorProto) -> Result<Tensor, String> {
    const ONNX_DOUBLE: i32 = 11;
    if t.data_type != ONNX_DOUBLE {
        return decode_tensor(t);
    }
    let mut f = t.clone();
    let v: Vec<f64> = if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(8) {
            return Err(format!(
                "raw_data has {} bytes, not a multiple of 8",
                t.raw_data.len()
            ));
        }
        t.raw_data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        t.double_data.clone()
    };
    f.data_type = ONNX_FLOAT;
    f.raw_data = vec![];
    f.double_data = vec![];
    f.float_data = v.iter().map(|&x| x as f32).collect();
    decode_tensor(&f)
}

// ---- the importer -------------------------------------------------------------

/// Why a node could not be imported.
enum NodeError {
    /// The op type itself is not supported.
    Unsupported,
    Invalid(String),
}

impl From<String> for NodeError {
    fn from(s: String) -> Self {
        NodeError::Invalid(s)
    }
}

impl From<&str> for NodeError {
    fn from(s: &str) -> Self {
        NodeError::Invalid(s.into())
    }
}

impl From<crate::graph::GraphError> for NodeError {
    fn from(e: crate::graph::GraphError) -> Self {
        NodeError::Invalid(e.to_string())
    }
}

type R<T> = Result<T, NodeError>;

fn invalid<T>(msg: impl Into<String>) -> R<T> {
    Err(NodeError::Invalid(msg.into()))
}

/// A node being imported: the proto and its resolved inputs.
struct Ctx<'a> {
    node: &'a NodeProto,
    ins: Vec<Option<NodeId>>,
}

impl Ctx<'_> {
    fn name(&self) -> String {
        node_label(self.node)
    }

    /// A required input.
    fn x(&self, i: usize) -> R<NodeId> {
        self.ins
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| NodeError::Invalid(format!("missing required input {i}")))
    }

    /// An optional input (absent or named "").
    fn opt(&self, i: usize) -> Option<NodeId> {
        self.ins.get(i).copied().flatten()
    }

    fn input_name(&self, i: usize) -> &str {
        self.node.input.get(i).map(String::as_str).unwrap_or("")
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map_or(default, |a| a.i)
    }

    fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).map_or(default, |a| a.f)
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.attr(name).map_or_else(
            || default.to_string(),
            |a| String::from_utf8_lossy(&a.s).into_owned(),
        )
    }

    /// Number of outputs the node declares (including "" placeholders).
    fn n_outputs(&self) -> usize {
        self.node.output.len()
    }

    /// Whether output `i` is requested (declared with a non-empty name).
    fn wants(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|s| !s.is_empty())
    }
}

fn node_label(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(o) = node.output.iter().find(|o| !o.is_empty()) {
        o.clone()
    } else {
        "<unnamed>".into()
    }
}

/// Normalise a possibly negative axis against `rank`.
fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return invalid(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn norm_axes(axes: &[i64], rank: usize) -> R<Vec<usize>> {
    let mut out = vec![];
    for &a in axes {
        let a = norm_axis(a, rank)?;
        if out.contains(&a) {
            return invalid(format!("axis {a} is repeated in {axes:?}"));
        }
        out.push(a);
    }
    Ok(out)
}

fn to_usize(v: i64, what: &str) -> R<usize> {
    usize::try_from(v)
        .map_err(|_| NodeError::Invalid(format!("{what} must be non-negative, got {v}")))
}

struct Importer<'a> {
    file: &'a str,
    opset: i64,
    g: Graph,
    /// ONNX value name -> node.
    env: HashMap<String, NodeId>,
}

impl Importer<'_> {
    fn define(&mut self, name: &str, id: NodeId) -> Result<(), String> {
        if self.env.insert(name.to_string(), id).is_some() {
            return Err(format!("value '{name}' is defined twice"));
        }
        Ok(())
    }

    fn import_node(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let invalid = |msg: String| ImportError::Invalid {
            file: self.file.into(),
            node: node_label(node),
            op: node.op_type.clone(),
            msg,
        };
        if !is_default_domain(&node.domain) {
            return Err(invalid(format!(
                "op domain '{}' is not supported (only the default ai.onnx domain is)",
                node.domain
            )));
        }
        let mut ins = vec![];
        for (i, name) in node.input.iter().enumerate() {
            if name.is_empty() {
                ins.push(None);
            } else {
                let id = self.env.get(name).copied().ok_or_else(|| {
                    invalid(format!(
                        "input {i} ('{name}') is not a graph input, an initializer or an earlier node's output"
                    ))
                })?;
                ins.push(Some(id));
            }
        }
        let ctx = Ctx { node, ins };
        let outs = match self.convert(&ctx) {
            Ok(o) => o,
            Err(NodeError::Unsupported) => {
                return Err(ImportError::UnsupportedOp {
                    file: self.file.into(),
                    op: node.op_type.clone(),
                    node: ctx.name(),
                })
            }
            Err(NodeError::Invalid(m)) => return Err(invalid(m)),
        };
        for (i, name) in node.output.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let Some(&id) = outs.get(i) else {
                return Err(invalid(format!("output {i} ('{name}') is not supported")));
            };
            self.define(name, id).map_err(invalid)?;
        }
        Ok(())
    }

    // ---- graph building helpers (errors instead of panics) ---------------

    fn ty(&self, id: NodeId) -> &TensorType {
        self.g.ty(id)
    }
    fn shape(&self, id: NodeId) -> Vec<usize> {
        self.g.shape(id).to_vec()
    }
    fn rank(&self, id: NodeId) -> usize {
        self.g.shape(id).len()
    }
    fn dtype(&self, id: NodeId) -> DType {
        self.g.dtype(id)
    }

    /// The value of a constant node (a `Const`, or a small `Fill`).
    fn const_value(&self, id: NodeId) -> Option<Value> {
        match &self.g.node(id).op {
            Op::Const(t) => Some(Value::from_tensor(t)),
            Op::Fill { value, ty } if ty.numel() <= 1 << 16 => Some(Value::fill(*value, ty)),
            _ => None,
        }
    }

    fn const_tensor(&self, id: NodeId) -> Option<Tensor> {
        match &self.g.node(id).op {
            Op::Const(t) => Some(t.clone()),
            _ => self.const_value(id).map(|v| v.to_tensor()),
        }
    }

    /// Add a node; if all its inputs are constants, add its value instead.
    fn nd(&mut self, op: Op, ins: &[NodeId]) -> R<NodeId> {
        if !ins.is_empty() {
            if let Some(vals) = ins
                .iter()
                .map(|&i| self.const_value(i))
                .collect::<Option<Vec<Value>>>()
            {
                let tys: Vec<&TensorType> = ins.iter().map(|&i| self.g.ty(i)).collect();
                let ty = ops::infer(&op, &tys).map_err(|msg| {
                    let shown: Vec<String> = tys.iter().map(|t| t.to_string()).collect();
                    format!("{}: {msg} (inputs: {})", op.name(), shown.join(", "))
                })?;
                let refs: Vec<&Value> = vals.iter().collect();
                let v = ops::eval(&op, &refs, &ty);
                return Ok(self.g.constant(v.to_tensor()));
            }
        }
        Ok(self.g.try_node(op, ins)?)
    }

    fn konst(&mut self, t: Tensor) -> NodeId {
        self.g.constant(t)
    }

    fn scalar(&mut self, dtype: DType, v: f64) -> NodeId {
        let t = match dtype {
            DType::F32 => Tensor::scalar_f32(v as f32),
            DType::I64 => Tensor::i64(&[], vec![v as i64]),
            DType::Bool => Tensor::bool(&[], vec![v != 0.0]),
        };
        self.konst(t)
    }

    fn un(&mut self, op: UnaryOp, x: NodeId) -> R<NodeId> {
        self.nd(Op::Unary(op), &[x])
    }
    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> R<NodeId> {
        let (da, db) = (self.dtype(a), self.dtype(b));
        if da != db {
            return invalid(format!(
                "operands have different element types ({da} and {db})"
            ));
        }
        self.nd(Op::Binary(op), &[a, b])
    }
    fn add(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Add, a, b)
    }
    fn sub(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Sub, a, b)
    }
    fn mul(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Mul, a, b)
    }
    fn div(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        self.bin(BinaryOp::Div, a, b)
    }
    fn mul_scalar(&mut self, x: NodeId, v: f64) -> R<NodeId> {
        let c = self.scalar(self.dtype(x), v);
        self.mul(x, c)
    }
    fn cmp(&mut self, op: CompareOp, a: NodeId, b: NodeId) -> R<NodeId> {
        self.nd(Op::Compare(op), &[a, b])
    }
    fn where_(&mut self, c: NodeId, a: NodeId, b: NodeId) -> R<NodeId> {
        self.nd(Op::Where, &[c, a, b])
    }
    fn not(&mut self, x: NodeId) -> R<NodeId> {
        self.un(UnaryOp::Not, x)
    }
    fn cast(&mut self, x: NodeId, to: DType) -> R<NodeId> {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.nd(Op::Cast(to), &[x])
    }
    fn reshape(&mut self, x: NodeId, shape: &[usize]) -> R<NodeId> {
        if self.g.shape(x) == shape {
            return Ok(x);
        }
        self.nd(Op::Reshape(shape.to_vec()), &[x])
    }
    fn transpose(&mut self, x: NodeId, perm: &[usize]) -> R<NodeId> {
        if perm.len() == self.rank(x) && perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.nd(Op::Transpose(perm.to_vec()), &[x])
    }
    fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> R<NodeId> {
        if start == 0 && self.g.shape(x).get(axis) == Some(&end) {
            return Ok(x);
        }
        self.nd(Op::Slice { axis, start, end }, &[x])
    }
    fn concat(&mut self, xs: &[NodeId], axis: usize) -> R<NodeId> {
        if xs.len() == 1 {
            return Ok(xs[0]);
        }
        self.nd(Op::Concat { axis }, xs)
    }
    fn expand(&mut self, x: NodeId, shape: &[usize]) -> R<NodeId> {
        if self.g.shape(x) == shape {
            return Ok(x);
        }
        self.nd(Op::Expand(shape.to_vec()), &[x])
    }
    fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: &[usize], keepdims: bool) -> R<NodeId> {
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        if axes.is_empty() {
            return Ok(x);
        }
        self.nd(Op::Reduce { op, axes, keepdims }, &[x])
    }
    fn reduce_all(&mut self, op: ReduceOp, x: NodeId) -> R<NodeId> {
        let axes: Vec<usize> = (0..self.rank(x)).collect();
        let y = self.reduce(op, x, &axes, false)?;
        // A rank-0 input reduces to itself.
        Ok(y)
    }
    fn matmul(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        self.nd(Op::MatMul, &[a, b])
    }
    fn sqrt(&mut self, x: NodeId) -> R<NodeId> {
        self.un(UnaryOp::Sqrt, x)
    }
    fn reciprocal(&mut self, x: NodeId) -> R<NodeId> {
        let one = self.scalar(self.dtype(x), 1.0);
        self.div(one, x)
    }

    fn require_float(&self, x: NodeId, what: &str) -> R<()> {
        if self.dtype(x) != DType::F32 {
            return invalid(format!("{what} must be float, got {}", self.ty(x)));
        }
        Ok(())
    }

    /// Input `i` as constant integers (an operand such as a shape or axes).
    fn const_ints(&self, c: &Ctx, i: usize, role: &str) -> R<Vec<i64>> {
        let id = c.x(i)?;
        let Some(t) = self.const_tensor(id) else {
            return invalid(format!(
                "input {i} ('{role}', value '{}') must be a constant, but it depends on a graph input or a \
                 parameter",
                c.input_name(i)
            ));
        };
        match t.data {
            TensorData::I64(v) => Ok(v),
            _ => invalid(format!(
                "input {i} ('{role}') must be int64, got {}",
                t.ty()
            )),
        }
    }

    /// Input `i` as a constant scalar (any dtype), as f64 and as a tensor.
    fn const_scalar(&self, c: &Ctx, i: usize, role: &str) -> R<Tensor> {
        let id = c.x(i)?;
        let Some(t) = self.const_tensor(id) else {
            return invalid(format!(
                "input {i} ('{role}', value '{}') must be a constant, but it depends on a graph input or a \
                 parameter",
                c.input_name(i)
            ));
        };
        if t.numel() != 1 {
            return invalid(format!(
                "input {i} ('{role}') must be a scalar, got {}",
                t.ty()
            ));
        }
        Ok(t)
    }

    /// Axes given as input `i` (newer opsets) or as the attribute `axes`.
    fn axes_operand(&self, c: &Ctx, i: usize) -> R<Option<Vec<i64>>> {
        if c.opt(i).is_some() {
            return Ok(Some(self.const_ints(c, i, "axes")?));
        }
        Ok(c.ints("axes"))
    }

    // ---- op conversion ---------------------------------------------------

    fn convert(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let op = c.node.op_type.as_str();
        let y = match op {
            // -- plumbing
            "Identity" => c.x(0)?,
            "Dropout" => {
                let x = c.x(0)?;
                if c.wants(1) {
                    let s = self.shape(x);
                    let mask = self.nd(
                        Op::Fill {
                            value: 1.0,
                            ty: TensorType::new(DType::Bool, &s),
                        },
                        &[],
                    )?;
                    return Ok(vec![x, mask]);
                }
                x
            }
            "Constant" => self.constant(c)?,
            "Cast" => {
                let to = c.attr("to").ok_or("missing attribute 'to'")?.i as i32;
                let to = ir_dtype(to).map_err(|m| format!("cast target: {m}"))?;
                self.cast(c.x(0)?, to)?
            }
            "CastLike" => {
                let to = self.dtype(c.x(1)?);
                self.cast(c.x(0)?, to)?
            }

            // -- elementwise arithmetic
            "Add" => self.add(c.x(0)?, c.x(1)?)?,
            "Sub" => self.sub(c.x(0)?, c.x(1)?)?,
            "Mul" => self.mul(c.x(0)?, c.x(1)?)?,
            "Div" => self.div(c.x(0)?, c.x(1)?)?,
            "Pow" => self.pow(c.x(0)?, c.x(1)?)?,
            "Sum" | "Min" | "Max" | "Mean" => {
                let bop = match op {
                    "Sum" | "Mean" => BinaryOp::Add,
                    "Min" => BinaryOp::Min,
                    _ => BinaryOp::Max,
                };
                let xs: Vec<NodeId> = (0..c.ins.len()).map(|i| c.x(i)).collect::<R<_>>()?;
                let mut acc = *xs.first().ok_or("needs at least one input")?;
                for &x in &xs[1..] {
                    acc = self.bin(bop, acc, x)?;
                }
                if op == "Mean" && xs.len() > 1 {
                    let n = self.scalar(self.dtype(acc), xs.len() as f64);
                    acc = self.div(acc, n)?;
                }
                // A single input still broadcasts nowhere: identity.
                acc
            }
            "Neg" => self.un(UnaryOp::Neg, c.x(0)?)?,
            "Abs" => self.un(UnaryOp::Abs, c.x(0)?)?,
            "Sign" => self.un(UnaryOp::Sign, c.x(0)?)?,
            "Exp" => self.un(UnaryOp::Exp, c.x(0)?)?,
            "Log" => self.un(UnaryOp::Log, c.x(0)?)?,
            "Sqrt" => self.un(UnaryOp::Sqrt, c.x(0)?)?,
            "Sigmoid" => self.un(UnaryOp::Sigmoid, c.x(0)?)?,
            "Tanh" => self.un(UnaryOp::Tanh, c.x(0)?)?,
            "Relu" => self.un(UnaryOp::Relu, c.x(0)?)?,
            "Erf" => self.un(UnaryOp::Erf, c.x(0)?)?,
            "Asinh" => self.un(UnaryOp::Asinh, c.x(0)?)?,
            "Reciprocal" => self.reciprocal(c.x(0)?)?,
            "LeakyRelu" => {
                let x = c.x(0)?;
                let alpha = self.scalar(DType::F32, c.float("alpha", 0.01) as f64);
                self.negative_slope(x, alpha)?
            }
            "PRelu" => {
                let x = c.x(0)?;
                self.negative_slope(x, c.x(1)?)?
            }
            "Gelu" => self.gelu(c.x(0)?, &c.string("approximate", "none"))?,
            "Clip" => self.clip(c)?,

            // -- comparisons and logic
            "Equal" => self.cmp(CompareOp::Equal, c.x(0)?, c.x(1)?)?,
            "Less" => self.cmp(CompareOp::Less, c.x(0)?, c.x(1)?)?,
            "Greater" => self.cmp(CompareOp::Greater, c.x(0)?, c.x(1)?)?,
            "LessOrEqual" | "GreaterOrEqual" => {
                let (a, b) = (c.x(0)?, c.x(1)?);
                let strict = if op == "LessOrEqual" {
                    CompareOp::Less
                } else {
                    CompareOp::Greater
                };
                let s = self.cmp(strict, a, b)?;
                let e = self.cmp(CompareOp::Equal, a, b)?;
                self.logic("Or", s, e)?
            }
            "Not" => self.not(c.x(0)?)?,
            "And" | "Or" | "Xor" => self.logic(op, c.x(0)?, c.x(1)?)?,
            "Where" => {
                let cond = c.x(0)?;
                if self.dtype(cond) != DType::Bool {
                    return invalid(format!("condition must be bool, got {}", self.ty(cond)));
                }
                self.where_(cond, c.x(1)?, c.x(2)?)?
            }

            // -- linear algebra
            "MatMul" => self.matmul_np(c.x(0)?, c.x(1)?)?,
            "Gemm" => self.gemm(c)?,
            "Conv" => self.conv(c)?,
            "ConvTranspose" => self.conv_transpose(c)?,

            // -- reductions and normalisation
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceSumSquare"
            | "ReduceL1" | "ReduceL2" | "ReduceLogSumExp" => self.reduce_op(c)?,
            "Softmax" | "LogSoftmax" => self.softmax(c)?,
            "LayerNormalization" => return self.layer_norm(c),
            "BatchNormalization" => self.batch_norm(c)?,
            "GlobalAveragePool" | "GlobalMaxPool" => {
                let x = c.x(0)?;
                if self.rank(x) < 3 {
                    return invalid(format!("expects an input of rank >= 3, got {}", self.ty(x)));
                }
                let axes: Vec<usize> = (2..self.rank(x)).collect();
                let r = if op == "GlobalAveragePool" {
                    ReduceOp::Mean
                } else {
                    ReduceOp::Max
                };
                self.reduce(r, x, &axes, true)?
            }
            "SoftmaxCrossEntropyLoss" => return self.cross_entropy(c, true),
            "NegativeLogLikelihoodLoss" => return self.cross_entropy(c, false),

            // -- layout
            "Reshape" => self.reshape_op(c)?,
            "Flatten" => {
                let x = c.x(0)?;
                let s = self.shape(x);
                let r = s.len() as i64;
                let axis = c.int("axis", 1);
                let a = if axis < 0 { axis + r } else { axis };
                if a < 0 || a > r {
                    return invalid(format!("axis {axis} is out of range for rank {r}"));
                }
                let a = a as usize;
                self.reshape(x, &[numel(&s[..a]), numel(&s[a..])])?
            }
            "Squeeze" => {
                let x = c.x(0)?;
                let s = self.shape(x);
                let axes = match self.axes_operand(c, 1)? {
                    Some(a) if !a.is_empty() => norm_axes(&a, s.len())?,
                    _ => (0..s.len()).filter(|&i| s[i] == 1).collect(),
                };
                if let Some(&a) = axes.iter().find(|&&a| s[a] != 1) {
                    return invalid(format!(
                        "cannot squeeze axis {a} of size {} (shape {s:?})",
                        s[a]
                    ));
                }
                let out: Vec<usize> = (0..s.len())
                    .filter(|i| !axes.contains(i))
                    .map(|i| s[i])
                    .collect();
                self.reshape(x, &out)?
            }
            "Unsqueeze" => {
                let x = c.x(0)?;
                let s = self.shape(x);
                let axes = self.axes_operand(c, 1)?.ok_or("missing axes")?;
                let r = s.len() + axes.len();
                let axes = norm_axes(&axes, r)?;
                let mut rest = s.iter();
                let out: Vec<usize> = (0..r)
                    .map(|i| {
                        if axes.contains(&i) {
                            1
                        } else {
                            *rest.next().unwrap()
                        }
                    })
                    .collect();
                self.reshape(x, &out)?
            }
            "Transpose" => {
                let x = c.x(0)?;
                let r = self.rank(x);
                let perm = match c.ints("perm") {
                    Some(p) => p
                        .iter()
                        .map(|&v| to_usize(v, "perm"))
                        .collect::<R<Vec<_>>>()?,
                    None => (0..r).rev().collect(),
                };
                self.transpose(x, &perm)?
            }
            "Concat" => {
                let xs: Vec<NodeId> = (0..c.ins.len()).map(|i| c.x(i)).collect::<R<_>>()?;
                let first = *xs.first().ok_or("needs at least one input")?;
                let axis = norm_axis(
                    c.attr("axis").ok_or("missing attribute 'axis'")?.i,
                    self.rank(first),
                )?;
                self.concat(&xs, axis)?
            }
            "Split" => return self.split(c),
            "Slice" => self.slice_op(c)?,
            "Gather" => self.gather(c)?,
            "Expand" => {
                let x = c.x(0)?;
                let s = self.const_ints(c, 1, "shape")?;
                let s: Vec<usize> = s.iter().map(|&d| to_usize(d, "shape")).collect::<R<_>>()?;
                let out = broadcast_shapes(&self.shape(x), &s)?;
                self.expand(x, &out)?
            }
            "Tile" => {
                let mut x = c.x(0)?;
                let reps = self.const_ints(c, 1, "repeats")?;
                if reps.len() != self.rank(x) {
                    return invalid(format!("{} repeats for rank {}", reps.len(), self.rank(x)));
                }
                for (axis, &r) in reps.iter().enumerate() {
                    let r = to_usize(r, "repeats")?;
                    x = if r == 0 {
                        self.slice(x, axis, 0, 0)?
                    } else {
                        self.concat(&vec![x; r], axis)?
                    };
                }
                x
            }

            // -- shape computations (constant by construction)
            "Shape" => {
                let s = self.shape(c.x(0)?);
                let r = s.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clampi(c.int("start", 0));
                let end = clampi(c.int("end", r)).max(start);
                let v: Vec<i64> = s[start..end].iter().map(|&d| d as i64).collect();
                self.konst(Tensor::i64(&[v.len()], v))
            }
            "Size" => {
                let n = self.ty(c.x(0)?).numel() as i64;
                self.konst(Tensor::i64(&[], vec![n]))
            }
            "ConstantOfShape" => self.constant_of_shape(c)?,
            "Range" => self.range(c)?,
            "Trilu" => self.trilu(c)?,
            "ReduceProd" => self.reduce_prod(c)?,

            _ => return Err(NodeError::Unsupported),
        };
        Ok(vec![y])
    }

    fn constant(&mut self, c: &Ctx) -> R<NodeId> {
        let attr = c
            .node
            .attribute
            .iter()
            .find(|a| a.name.starts_with("value") || a.name == "sparse_value")
            .ok_or(
                "has no value attribute (value, value_float, value_floats, value_int, value_ints)",
            )?;
        let t = match attr.name.as_str() {
            "value" => {
                let t = attr.t.as_ref().ok_or("attribute 'value' holds no tensor")?;
                decode_constant(t).map_err(|m| format!("value: {m}"))?
            }
            "value_float" => Tensor::scalar_f32(attr.f),
            "value_floats" => Tensor::f32(&[attr.floats.len()], attr.floats.clone()),
            "value_int" => Tensor::i64(&[], vec![attr.i]),
            "value_ints" => Tensor::i64(&[attr.ints.len()], attr.ints.clone()),
            other => return invalid(format!("value attribute '{other}' is not supported")),
        };
        Ok(self.konst(t))
    }

    fn constant_of_shape(&mut self, c: &Ctx) -> R<NodeId> {
        let s = self.const_ints(c, 0, "shape")?;
        let s: Vec<usize> = s.iter().map(|&d| to_usize(d, "shape")).collect::<R<_>>()?;
        let value = match c.attr("value").and_then(|a| a.t.as_ref()) {
            Some(t) => decode_tensor(t).map_err(|m| format!("value: {m}"))?,
            None => Tensor::f32(&[1], vec![0.0]),
        };
        if value.numel() != 1 {
            return invalid(format!("value must hold one element, got {}", value.ty()));
        }
        let n = numel(&s);
        let t = match &value.data {
            TensorData::F32(v) => Tensor::f32(&s, vec![v[0]; n]),
            TensorData::I64(v) => Tensor::i64(&s, vec![v[0]; n]),
            TensorData::Bool(v) => Tensor::bool(&s, vec![v[0]; n]),
        };
        if n <= 1 << 12 {
            return Ok(self.konst(t));
        }
        let v = match &value.data {
            TensorData::F32(v) => v[0] as f64,
            TensorData::I64(v) => v[0] as f64,
            TensorData::Bool(v) => v[0] as u8 as f64,
        };
        self.nd(
            Op::Fill {
                value: v,
                ty: TensorType::new(value.dtype(), &s),
            },
            &[],
        )
    }

    fn range(&mut self, c: &Ctx) -> R<NodeId> {
        let (s, l, d) = (
            self.const_scalar(c, 0, "start")?,
            self.const_scalar(c, 1, "limit")?,
            self.const_scalar(c, 2, "delta")?,
        );
        if s.dtype() != l.dtype() || s.dtype() != d.dtype() {
            return invalid("start, limit and delta must share an element type");
        }
        match (&s.data, &l.data, &d.data) {
            (TensorData::I64(s), TensorData::I64(l), TensorData::I64(d)) => {
                let (s, l, d) = (s[0], l[0], d[0]);
                if d == 0 {
                    return invalid("delta is 0");
                }
                let n = ((l as f64 - s as f64) / d as f64).ceil().max(0.0) as usize;
                let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
                Ok(self.konst(Tensor::i64(&[n], v)))
            }
            (TensorData::F32(s), TensorData::F32(l), TensorData::F32(d)) => {
                let (s, l, d) = (s[0], l[0], d[0]);
                if d == 0.0 {
                    return invalid("delta is 0");
                }
                let n = ((l - s) / d).ceil().max(0.0) as usize;
                let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
                Ok(self.konst(Tensor::f32(&[n], v)))
            }
            _ => invalid("Range of bool"),
        }
    }

    fn pow(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        let b = self.cast(b, self.dtype(a))?;
        if self.dtype(a) == DType::F32 && self.g.shape(b).iter().product::<usize>() == 1 {
            if let Some(e) = self.const_tensor(b).and_then(|t| t.as_f32().map(|v| v[0])) {
                // Keep the common exponents in simpler ops (cheaper and
                // better-behaved derivatives); the result keeps Pow's shape.
                let out = broadcast_shapes(&self.shape(a), &self.shape(b))?;
                let y = match e {
                    1.0 => Some(a),
                    2.0 => Some(self.mul(a, a)?),
                    0.5 => Some(self.sqrt(a)?),
                    -1.0 => Some(self.reciprocal(a)?),
                    _ => None,
                };
                if let Some(y) = y {
                    return self.expand(y, &out);
                }
            }
        }
        self.bin(BinaryOp::Pow, a, b)
    }

    /// `x` where `x >= 0`, `slope * x` elsewhere (LeakyRelu, PRelu).
    fn negative_slope(&mut self, x: NodeId, slope: NodeId) -> R<NodeId> {
        self.require_float(x, "input")?;
        let zero = self.scalar(DType::F32, 0.0);
        let neg = self.cmp(CompareOp::Less, x, zero)?;
        let sx = self.mul(x, slope)?;
        self.where_(neg, sx, x)
    }

    fn gelu(&mut self, x: NodeId, approximate: &str) -> R<NodeId> {
        self.require_float(x, "input")?;
        let inner = match approximate {
            "none" => {
                // 0.5 x (1 + erf(x / sqrt 2))
                let r2 = self.scalar(DType::F32, std::f64::consts::SQRT_2);
                let t = self.div(x, r2)?;
                self.un(UnaryOp::Erf, t)?
            }
            "tanh" => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let x2 = self.mul(x, x)?;
                let x3 = self.mul(x2, x)?;
                let t = self.mul_scalar(x3, 0.044715)?;
                let t = self.add(x, t)?;
                let t = self.mul_scalar(t, (2.0 / std::f64::consts::PI).sqrt())?;
                self.un(UnaryOp::Tanh, t)?
            }
            other => {
                return invalid(format!(
                    "approximate='{other}' is not supported (none, tanh)"
                ))
            }
        };
        let one = self.scalar(DType::F32, 1.0);
        let t = self.add(inner, one)?;
        let t = self.mul(x, t)?;
        self.mul_scalar(t, 0.5)
    }

    fn clip(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let dt = self.dtype(x);
        let (lo, hi) = if c.ins.len() > 1 || self.opset >= 11 {
            (c.opt(1), c.opt(2))
        } else {
            let lo = c.attr("min").map(|a| a.f as f64);
            let hi = c.attr("max").map(|a| a.f as f64);
            (
                lo.map(|v| self.scalar(dt, v)),
                hi.map(|v| self.scalar(dt, v)),
            )
        };
        let mut y = x;
        if let Some(lo) = lo {
            y = self.bin(BinaryOp::Max, y, lo)?;
        }
        if let Some(hi) = hi {
            y = self.bin(BinaryOp::Min, y, hi)?;
        }
        let s = self.shape(x);
        self.expand(y, &s)
    }

    fn logic(&mut self, op: &str, a: NodeId, b: NodeId) -> R<NodeId> {
        for x in [a, b] {
            if self.dtype(x) != DType::Bool {
                return invalid(format!("operands must be bool, got {}", self.ty(x)));
            }
        }
        match op {
            "And" => {
                let f = self.scalar(DType::Bool, 0.0);
                self.where_(a, b, f)
            }
            "Or" => {
                let t = self.scalar(DType::Bool, 1.0);
                self.where_(a, t, b)
            }
            _ => {
                let nb = self.not(b)?;
                self.where_(a, nb, b)
            }
        }
    }

    /// MatMul with numpy semantics for rank-1 operands.
    fn matmul_np(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        if sa.is_empty() || sb.is_empty() {
            return invalid("MatMul operands must have rank >= 1");
        }
        let a2 = if sa.len() == 1 {
            self.reshape(a, &[1, sa[0]])?
        } else {
            a
        };
        let b2 = if sb.len() == 1 {
            self.reshape(b, &[sb[0], 1])?
        } else {
            b
        };
        let y = self.matmul(a2, b2)?;
        if sa.len() > 1 && sb.len() > 1 {
            return Ok(y);
        }
        let s = self.shape(y);
        let r = s.len();
        let mut out = s[..r - 2].to_vec();
        if sa.len() > 1 {
            out.push(s[r - 2]);
        }
        if sb.len() > 1 {
            out.push(s[r - 1]);
        }
        self.reshape(y, &out)
    }

    fn gemm(&mut self, c: &Ctx) -> R<NodeId> {
        let (mut a, mut b) = (c.x(0)?, c.x(1)?);
        if self.rank(a) != 2 || self.rank(b) != 2 {
            return invalid(format!(
                "A and B must be rank 2, got {} and {}",
                self.ty(a),
                self.ty(b)
            ));
        }
        if c.int("transA", 0) != 0 {
            a = self.transpose(a, &[1, 0])?;
        }
        if c.int("transB", 0) != 0 {
            b = self.transpose(b, &[1, 0])?;
        }
        let mut y = self.matmul(a, b)?;
        let mn = self.shape(y);
        let alpha = c.float("alpha", 1.0);
        if alpha != 1.0 {
            y = self.mul_scalar(y, alpha as f64)?;
        }
        let beta = c.float("beta", 1.0);
        if let Some(cc) = c.opt(2) {
            if beta != 0.0 {
                let cc = if beta != 1.0 {
                    self.mul_scalar(cc, beta as f64)?
                } else {
                    cc
                };
                y = self.add(y, cc)?;
            }
        }
        if self.shape(y) != mn {
            return invalid(format!(
                "C does not broadcast to the product's shape {mn:?}"
            ));
        }
        Ok(y)
    }

    /// Spatial attributes of Conv/ConvTranspose as 2-D parameters.
    fn conv_params(&self, c: &Ctx, xs: &[usize], ws: &[usize], transpose: bool) -> R<ConvParams> {
        let sp = xs.len() - 2;
        let kernel = &ws[2..];
        if let Some(k) = c.ints("kernel_shape") {
            if k.iter().map(|&v| v as usize).ne(kernel.iter().copied()) {
                return invalid(format!(
                    "kernel_shape {k:?} does not match the weight {ws:?}"
                ));
            }
        }
        let get = |name: &str, n: usize, default: usize| -> R<Vec<usize>> {
            match c.ints(name) {
                Some(v) if v.len() == n => v.iter().map(|&x| to_usize(x, name)).collect(),
                Some(v) => invalid(format!("{name} has {} values, expected {n}", v.len())),
                None => Ok(vec![default; n]),
            }
        };
        let strides = get("strides", sp, 1)?;
        let dil = get("dilations", sp, 1)?;
        let mut pads = get("pads", 2 * sp, 0)?;
        match c.string("auto_pad", "NOTSET").as_str() {
            "NOTSET" | "" => {}
            "VALID" => pads = vec![0; 2 * sp],
            mode @ ("SAME_UPPER" | "SAME_LOWER") if !transpose => {
                for i in 0..sp {
                    let out = xs[2 + i].div_ceil(strides[i]);
                    let eff = dil[i] * (kernel[i] - 1) + 1;
                    let total = ((out - 1) * strides[i] + eff).saturating_sub(xs[2 + i]);
                    let small = total / 2;
                    let (b, e) = if mode == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    pads[i] = b;
                    pads[sp + i] = e;
                }
            }
            other => return invalid(format!("auto_pad='{other}' is not supported")),
        }
        Ok(if sp == 1 {
            ConvParams {
                stride: [1, strides[0]],
                pads: [0, pads[0], 0, pads[1]],
                dilation: [1, dil[0]],
            }
        } else {
            ConvParams {
                stride: [strides[0], strides[1]],
                pads: [pads[0], pads[1], pads[2], pads[3]],
                dilation: [dil[0], dil[1]],
            }
        })
    }

    /// Check a conv's ranks; returns the shapes of x and w and whether the
    /// conv is 1-D (lifted to 2-D with a unit height).
    fn conv_operands(&self, x: NodeId, w: NodeId) -> R<(Vec<usize>, Vec<usize>)> {
        let (xs, ws) = (self.shape(x), self.shape(w));
        if !(3..=4).contains(&xs.len()) || ws.len() != xs.len() {
            return invalid(format!(
                "only 1-D and 2-D convolutions are supported (input {}, weight {})",
                self.ty(x),
                self.ty(w)
            ));
        }
        self.require_float(x, "input")?;
        self.require_float(w, "weight")?;
        Ok((xs, ws))
    }

    fn lift_1d(&mut self, t: NodeId) -> R<NodeId> {
        let s = self.shape(t);
        if s.len() == 3 {
            return self.reshape(t, &[s[0], s[1], 1, s[2]]);
        }
        Ok(t)
    }

    fn add_channel_bias(&mut self, y: NodeId, bias: Option<NodeId>) -> R<NodeId> {
        let Some(b) = bias else { return Ok(y) };
        let s = self.shape(y);
        let mut bs = vec![1; s.len()];
        bs[1] = s[1];
        if self.shape(b) != [s[1]] {
            return invalid(format!(
                "bias must have shape [{}], got {}",
                s[1],
                self.ty(b)
            ));
        }
        let b = self.reshape(b, &bs)?;
        self.add(y, b)
    }

    fn conv(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, w) = (c.x(0)?, c.x(1)?);
        let (xs, ws) = self.conv_operands(x, w)?;
        let p = self.conv_params(c, &xs, &ws, false)?;
        let group = to_usize(c.int("group", 1), "group")?;
        let (ch, o) = (xs[1], ws[0]);
        if group == 0 || ch % group != 0 || o % group != 0 || ws[1] * group != ch {
            return invalid(format!(
                "group={group} does not fit input channels {ch} and weight {ws:?}"
            ));
        }
        let (x4, w4) = (self.lift_1d(x)?, self.lift_1d(w)?);
        let mut ys = vec![];
        for gi in 0..group {
            let (ci, oi) = (ch / group, o / group);
            let xg = self.slice(x4, 1, gi * ci, (gi + 1) * ci)?;
            let wg = self.slice(w4, 0, gi * oi, (gi + 1) * oi)?;
            ys.push(self.nd(Op::Conv2d(p), &[xg, wg])?);
        }
        let mut y = self.concat(&ys, 1)?;
        if xs.len() == 3 {
            let s = self.shape(y);
            y = self.reshape(y, &[s[0], s[1], s[3]])?;
        }
        self.add_channel_bias(y, c.opt(2))
    }

    fn conv_transpose(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, w) = (c.x(0)?, c.x(1)?);
        let (xs, ws) = self.conv_operands(x, w)?;
        if c.int("group", 1) != 1 {
            return invalid("only group=1 is supported");
        }
        if c.attr("output_shape").is_some() {
            return invalid(
                "the output_shape attribute is not supported (give pads and output_padding)",
            );
        }
        let p = self.conv_params(c, &xs, &ws, true)?;
        let sp = xs.len() - 2;
        let op = match c.ints("output_padding") {
            Some(v) if v.len() == sp => v
                .iter()
                .map(|&x| to_usize(x, "output_padding"))
                .collect::<R<Vec<_>>>()?,
            Some(v) => {
                return invalid(format!(
                    "output_padding has {} values, expected {sp}",
                    v.len()
                ))
            }
            None => vec![0; sp],
        };
        let output_padding = if sp == 1 { [0, op[0]] } else { [op[0], op[1]] };
        let (x4, w4) = (self.lift_1d(x)?, self.lift_1d(w)?);
        let mut y = self.nd(
            Op::ConvTranspose2d {
                params: p,
                output_padding,
            },
            &[x4, w4],
        )?;
        if xs.len() == 3 {
            let s = self.shape(y);
            y = self.reshape(y, &[s[0], s[1], s[3]])?;
        }
        self.add_channel_bias(y, c.opt(2))
    }

    /// Trilu: `x` masked by a constant triangle.
    fn trilu(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let s = self.shape(x);
        if s.len() < 2 {
            return invalid(format!("input must have rank >= 2, got {}", self.ty(x)));
        }
        let k = match c.opt(1) {
            Some(_) => self
                .const_scalar(c, 1, "k")?
                .as_i64()
                .ok_or("k must be int64")?[0],
            None => 0,
        };
        let upper = c.int("upper", 1) != 0;
        let (m, n) = (s[s.len() - 2], s[s.len() - 1]);
        let mask: Vec<bool> = (0..m * n)
            .map(|p| {
                let d = (p % n) as i64 - (p / n) as i64;
                if upper {
                    d >= k
                } else {
                    d <= k
                }
            })
            .collect();
        let mask = self.konst(Tensor::bool(&[m, n], mask));
        let zero = self.scalar(self.dtype(x), 0.0);
        let y = self.where_(mask, x, zero)?;
        self.expand(y, &s)
    }

    /// ReduceProd, for constant inputs only (shape arithmetic such as the
    /// element count of a shape); the IR has no product reduction.
    fn reduce_prod(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let Some(v) = self.const_value(x) else {
            return invalid("ReduceProd is only supported on constant inputs (shape computations)");
        };
        let r = self.rank(x);
        let keep = c.int("keepdims", 1) != 0;
        let mut axes = match self.axes_operand(c, 1)? {
            Some(a) if !a.is_empty() => norm_axes(&a, r)?,
            _ if c.int("noop_with_empty_axes", 0) != 0 => return Ok(x),
            _ => (0..r).collect(),
        };
        axes.sort_unstable();
        fn prod<T: Copy + std::ops::Mul<Output = T>>(
            a: &ndarray::ArrayD<T>,
            axes: &[usize],
            one: T,
            keep: bool,
        ) -> ndarray::ArrayD<T> {
            let mut a = a.clone();
            for &ax in axes.iter().rev() {
                a = a.fold_axis(ndarray::Axis(ax), one, |&p, &x| p * x);
                if keep {
                    a = a.insert_axis(ndarray::Axis(ax));
                }
            }
            a
        }
        let out = match &v {
            Value::F(a) => Value::F(prod(a, &axes, 1.0, keep)),
            Value::I(a) => Value::I(prod(a, &axes, 1, keep)),
            Value::B(_) => return invalid("ReduceProd of bool"),
        };
        Ok(self.konst(out.to_tensor()))
    }

    fn reduce_op(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let r = self.rank(x);
        let keep = c.int("keepdims", 1) != 0;
        let axes = match self.axes_operand(c, 1)? {
            Some(a) if !a.is_empty() => norm_axes(&a, r)?,
            _ if c.int("noop_with_empty_axes", 0) != 0 => return Ok(x),
            _ => (0..r).collect(),
        };
        let op = c.node.op_type.as_str();
        match op {
            "ReduceSum" => self.reduce(ReduceOp::Sum, x, &axes, keep),
            "ReduceMean" => self.reduce(ReduceOp::Mean, x, &axes, keep),
            "ReduceMax" => self.reduce(ReduceOp::Max, x, &axes, keep),
            "ReduceMin" => {
                let n = self.un(UnaryOp::Neg, x)?;
                let m = self.reduce(ReduceOp::Max, n, &axes, keep)?;
                self.un(UnaryOp::Neg, m)
            }
            "ReduceSumSquare" | "ReduceL2" => {
                let sq = self.mul(x, x)?;
                let s = self.reduce(ReduceOp::Sum, sq, &axes, keep)?;
                if op == "ReduceL2" {
                    self.sqrt(s)
                } else {
                    Ok(s)
                }
            }
            "ReduceL1" => {
                let a = self.un(UnaryOp::Abs, x)?;
                self.reduce(ReduceOp::Sum, a, &axes, keep)
            }
            _ => {
                // log(sum(exp(x - m))) + m with m = max(x) held constant: exact
                // for any m, so its derivatives are those of logsumexp.
                self.require_float(x, "input")?;
                let m = self.reduce(ReduceOp::Max, x, &axes, true)?;
                let m = self.nd(Op::StopGradient, &[m])?;
                let d = self.sub(x, m)?;
                let e = self.un(UnaryOp::Exp, d)?;
                let s = self.reduce(ReduceOp::Sum, e, &axes, keep)?;
                let l = self.un(UnaryOp::Log, s)?;
                let out = self.shape(l);
                let m = self.reshape(m, &out)?;
                self.add(l, m)
            }
        }
    }

    fn softmax(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let s = self.shape(x);
        let log = c.node.op_type == "LogSoftmax";
        let mk = |axis| {
            if log {
                Op::LogSoftmax { axis }
            } else {
                Op::Softmax { axis }
            }
        };
        if self.opset >= 13 {
            let axis = norm_axis(c.int("axis", -1), s.len())?;
            return self.nd(mk(axis), &[x]);
        }
        // Before opset 13 the input is coerced to 2-D at `axis` and the
        // softmax runs over the flattened trailing axes.
        let axis = norm_axis(c.int("axis", 1), s.len())?;
        if axis == s.len() - 1 {
            return self.nd(mk(axis), &[x]);
        }
        let flat = self.reshape(x, &[numel(&s[..axis]), numel(&s[axis..])])?;
        let y = self.nd(mk(1), &[flat])?;
        self.reshape(y, &s)
    }

    fn layer_norm(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let r = self.rank(x);
        let axis = norm_axis(c.int("axis", -1), r)?;
        let eps = c.float("epsilon", 1e-5) as f64;
        let axes: Vec<usize> = (axis..r).collect();
        let mean = self.reduce(ReduceOp::Mean, x, &axes, true)?;
        let d = self.sub(x, mean)?;
        let d2 = self.mul(d, d)?;
        let var = self.reduce(ReduceOp::Mean, d2, &axes, true)?;
        let eps = self.scalar(DType::F32, eps);
        let ve = self.add(var, eps)?;
        let std = self.sqrt(ve)?;
        let mut y = self.div(d, std)?;
        y = self.mul(y, c.x(1)?)?;
        if let Some(b) = c.opt(2) {
            y = self.add(y, b)?;
        }
        let s = self.shape(x);
        if self.shape(y) != s {
            return invalid(format!(
                "scale/bias do not broadcast to the input's shape {s:?}"
            ));
        }
        let inv = if c.wants(2) {
            self.reciprocal(std)?
        } else {
            std
        };
        Ok(vec![y, mean, inv])
    }

    fn batch_norm(&mut self, c: &Ctx) -> R<NodeId> {
        if c.int("training_mode", 0) != 0
            || c.n_outputs() > 1 && (1..c.n_outputs()).any(|i| c.wants(i))
        {
            return invalid("only inference mode is supported (training_mode=0, one output)");
        }
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let s = self.shape(x);
        if s.len() < 2 {
            return invalid(format!("input must have rank >= 2, got {}", self.ty(x)));
        }
        let mut bs = vec![1; s.len() - 1];
        bs[0] = s[1];
        let mut p = vec![];
        for (i, role) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
            let t = c.x(i)?;
            if self.shape(t) != [s[1]] {
                return invalid(format!(
                    "{role} must have shape [{}], got {}",
                    s[1],
                    self.ty(t)
                ));
            }
            p.push(self.reshape(t, &bs)?);
        }
        let eps = self.scalar(DType::F32, c.float("epsilon", 1e-5) as f64);
        let d = self.sub(x, p[2])?;
        let ve = self.add(p[3], eps)?;
        let std = self.sqrt(ve)?;
        let y = self.div(d, std)?;
        let y = self.mul(y, p[0])?;
        self.add(y, p[1])
    }

    /// SoftmaxCrossEntropyLoss (from logits) and NegativeLogLikelihoodLoss
    /// (from log-probabilities): classes on axis 1, int64 labels, optional
    /// class weights, optional ignore_index, reduction none/sum/mean.
    fn cross_entropy(&mut self, c: &Ctx, from_logits: bool) -> R<Vec<NodeId>> {
        let (scores, labels) = (c.x(0)?, c.x(1)?);
        self.require_float(scores, "scores")?;
        let ss = self.shape(scores);
        if ss.len() < 2 {
            return invalid(format!(
                "scores must have rank >= 2 ([N, C, ...]), got {}",
                self.ty(scores)
            ));
        }
        let mut want_labels = ss.clone();
        want_labels.remove(1);
        if self.dtype(labels) != DType::I64 || self.shape(labels) != want_labels {
            return invalid(format!(
                "labels must be int64 {want_labels:?} for scores {}, got {}",
                self.ty(scores),
                self.ty(labels)
            ));
        }
        let reduction = c.string("reduction", "mean");
        if !matches!(reduction.as_str(), "none" | "sum" | "mean") {
            return invalid(format!(
                "reduction='{reduction}' is not supported (none, sum, mean)"
            ));
        }
        let r = ss.len();
        let classes = ss[1];
        let lp = if from_logits {
            self.nd(Op::LogSoftmax { axis: 1 }, &[scores])?
        } else {
            scores
        };

        // hit[n, c, ...] = labels[n, ...] == c
        let mut ls = want_labels.clone();
        ls.insert(1, 1);
        let lab = self.reshape(labels, &ls)?;
        let mut rs = vec![1; r];
        rs[1] = classes;
        let range = self.konst(Tensor::i64(&rs, (0..classes as i64).collect()));
        let hit = self.cmp(CompareOp::Equal, lab, range)?;
        let zero = self.scalar(DType::F32, 0.0);
        let picked = self.where_(hit, lp, zero)?;
        let picked = self.reduce(ReduceOp::Sum, picked, &[1], false)?;
        let mut li = self.un(UnaryOp::Neg, picked)?;

        // Per-element weights: weight[label] and/or the ignore mask.
        let mut w = None;
        if let Some(wt) = c.opt(2) {
            if self.shape(wt) != [classes] || self.dtype(wt) != DType::F32 {
                return invalid(format!(
                    "weights must be float [{classes}], got {}",
                    self.ty(wt)
                ));
            }
            let wb = self.reshape(wt, &rs)?;
            let sel = self.where_(hit, wb, zero)?;
            w = Some(self.reduce(ReduceOp::Sum, sel, &[1], false)?);
        }
        if let Some(ii) = c.attr("ignore_index").map(|a| a.i) {
            let iic = self.konst(Tensor::i64(&[], vec![ii]));
            let eq = self.cmp(CompareOp::Equal, labels, iic)?;
            let keep = self.not(eq)?;
            let m = self.cast(keep, DType::F32)?;
            w = Some(match w {
                Some(w) => self.mul(w, m)?,
                None => m,
            });
        }
        if let Some(w) = w {
            li = self.mul(li, w)?;
        }
        let loss = match reduction.as_str() {
            "none" => li,
            "sum" => self.reduce_all(ReduceOp::Sum, li)?,
            _ => {
                let total = self.reduce_all(ReduceOp::Sum, li)?;
                let count = match w {
                    Some(w) => self.reduce_all(ReduceOp::Sum, w)?,
                    None => self.scalar(DType::F32, numel(&want_labels) as f64),
                };
                self.div(total, count)?
            }
        };
        Ok(if from_logits {
            vec![loss, lp]
        } else {
            vec![loss]
        })
    }

    fn reshape_op(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let xs = self.shape(x);
        let spec = match c.opt(1) {
            Some(_) => self.const_ints(c, 1, "shape")?,
            None => c.ints("shape").ok_or("missing shape")?,
        };
        let allowzero = c.int("allowzero", 0) != 0;
        let mut out = vec![];
        let mut infer = None;
        for (i, &d) in spec.iter().enumerate() {
            match d {
                -1 => {
                    if infer.replace(i).is_some() {
                        return invalid(format!("shape {spec:?} has more than one -1"));
                    }
                    out.push(1);
                }
                0 if !allowzero => out.push(*xs.get(i).ok_or_else(|| {
                    format!(
                        "shape {spec:?}: 0 at axis {i} copies a dimension the input {xs:?} lacks"
                    )
                })?),
                d if d < 0 => return invalid(format!("shape {spec:?} has invalid dimension {d}")),
                d => out.push(d as usize),
            }
        }
        if let Some(i) = infer {
            let known = numel(&out);
            if known == 0 || !numel(&xs).is_multiple_of(known) {
                return invalid(format!("cannot reshape {xs:?} to {spec:?}"));
            }
            out[i] = numel(&xs) / known;
        }
        if numel(&out) != numel(&xs) {
            return invalid(format!(
                "cannot reshape {xs:?} ({} elements) to {spec:?}",
                numel(&xs)
            ));
        }
        self.reshape(x, &out)
    }

    fn split(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        let xs = self.shape(x);
        let axis = norm_axis(c.int("axis", 0), xs.len())?;
        let dim = xs[axis];
        let n_out = c.n_outputs();
        let sizes: Vec<usize> = if c.opt(1).is_some() {
            let v = self.const_ints(c, 1, "split")?;
            v.iter().map(|&s| to_usize(s, "split")).collect::<R<_>>()?
        } else if let Some(v) = c.ints("split") {
            v.iter().map(|&s| to_usize(s, "split")).collect::<R<_>>()?
        } else {
            let k = match c.attr("num_outputs") {
                Some(a) => to_usize(a.i, "num_outputs")?,
                None => n_out,
            };
            if k == 0 {
                return invalid("no outputs to split into");
            }
            let chunk = dim.div_ceil(k);
            if chunk * (k - 1) > dim {
                return invalid(format!("cannot split {dim} into {k} parts"));
            }
            let mut v = vec![chunk; k - 1];
            v.push(dim - chunk * (k - 1));
            v
        };
        if sizes.iter().sum::<usize>() != dim {
            return invalid(format!("split sizes {sizes:?} do not add up to {dim}"));
        }
        if sizes.len() < n_out {
            return invalid(format!("{} split sizes for {n_out} outputs", sizes.len()));
        }
        let mut outs = vec![];
        let mut off = 0;
        for s in sizes {
            outs.push(self.slice(x, axis, off, off + s)?);
            off += s;
        }
        Ok(outs)
    }

    fn slice_op(&mut self, c: &Ctx) -> R<NodeId> {
        let mut x = c.x(0)?;
        let xs = self.shape(x);
        let r = xs.len();
        let (starts, ends, axes, steps) = if c.ins.len() >= 3 {
            let starts = self.const_ints(c, 1, "starts")?;
            let ends = self.const_ints(c, 2, "ends")?;
            let axes = match c.opt(3) {
                Some(_) => Some(self.const_ints(c, 3, "axes")?),
                None => None,
            };
            let steps = match c.opt(4) {
                Some(_) => Some(self.const_ints(c, 4, "steps")?),
                None => None,
            };
            (starts, ends, axes, steps)
        } else {
            (
                c.ints("starts").ok_or("missing starts")?,
                c.ints("ends").ok_or("missing ends")?,
                c.ints("axes"),
                None,
            )
        };
        let k = starts.len();
        let axes = axes.unwrap_or_else(|| (0..k as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; k]);
        if ends.len() != k || axes.len() != k || steps.len() != k {
            return invalid("starts, ends, axes and steps differ in length");
        }
        let axes = norm_axes(&axes, r)?;
        for i in 0..k {
            let (a, step) = (axes[i], steps[i]);
            let dim = xs[a] as i64;
            let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
            if step == 1 {
                let s = wrap(starts[i]).clamp(0, dim);
                let e = wrap(ends[i]).clamp(0, dim).max(s);
                x = self.slice(x, a, s as usize, e as usize)?;
                continue;
            }
            // Other steps: the same clamping rules, then a constant Gather.
            let idx: Vec<i64> = if step > 0 {
                let s = wrap(starts[i]).clamp(0, dim);
                let e = wrap(ends[i]).clamp(0, dim);
                (s..e).step_by(step as usize).collect()
            } else if step < 0 {
                let s = wrap(starts[i]).clamp(-1, dim - 1);
                let e = wrap(ends[i]).clamp(-1, dim - 1);
                let mut v = vec![];
                let mut j = s;
                while j > e {
                    v.push(j);
                    j += step;
                }
                v
            } else {
                return invalid(format!("step 0 on axis {a}"));
            };
            x = if idx.is_empty() {
                self.slice(x, a, 0, 0)?
            } else {
                let it = self.konst(Tensor::i64(&[idx.len()], idx));
                self.nd(Op::Gather { axis: a }, &[x, it])?
            };
        }
        Ok(x)
    }

    fn gather(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, idx) = (c.x(0)?, c.x(1)?);
        let xs = self.shape(x);
        let axis = norm_axis(c.int("axis", 0), xs.len())?;
        let dim = xs[axis] as i64;
        if self.dtype(idx) != DType::I64 {
            return invalid(format!(
                "indices must be int64 (or int32), got {}",
                self.ty(idx)
            ));
        }
        let idx = if let Some(t) = self.const_tensor(idx) {
            let v = t.as_i64().unwrap();
            let mut out = Vec::with_capacity(v.len());
            for &i in v {
                let j = if i < 0 { i + dim } else { i };
                if j < 0 || j >= dim {
                    return invalid(format!(
                        "index {i} is out of range for axis {axis} of size {dim}"
                    ));
                }
                out.push(j);
            }
            if out.is_empty() {
                // Nothing to gather: an empty result of the right shape.
                let mut s = xs[..axis].to_vec();
                s.extend(&t.shape);
                s.extend(&xs[axis + 1..]);
                let t = match self.dtype(x) {
                    DType::F32 => Tensor::f32(&s, vec![]),
                    DType::I64 => Tensor::i64(&s, vec![]),
                    DType::Bool => Tensor::bool(&s, vec![]),
                };
                return Ok(self.konst(t));
            }
            self.konst(Tensor::i64(&t.shape, out))
        } else {
            // Runtime indices: negatives wrapped into [0, dim) in the graph,
            // as constant indices are above, so the Gather sees
            // non-negative indices either way.
            let zero = self.scalar(DType::I64, 0.0);
            let neg = self.cmp(CompareOp::Less, idx, zero)?;
            let d = self.scalar(DType::I64, dim as f64);
            let wrapped = self.add(idx, d)?;
            self.where_(neg, wrapped, idx)?
        };
        self.nd(Op::Gather { axis }, &[x, idx])
    }
}
