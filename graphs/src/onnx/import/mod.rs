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
//!
//! One loader per ONNX op type, grouped by family in the submodules
//! (`constants`, `elementwise`, `layout`, `linalg`, `nn`, `reduce`), each
//! with its table `LOADERS`; [`supported_ops`] lists them. Adding an op is
//! one entry in its family's table (and its loader, where it is more than a
//! line); this module holds the model level and the graph-building helpers
//! the loaders share. The tests mirror the families
//! (`graphs/tests/import/`).

mod constants;
mod elementwise;
mod layout;
mod linalg;
mod nn;
mod pool;
mod reduce;

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

/// Import the ONNX model at `path`. Tensors stored as external data (as
/// `torch.onnx.export(dynamo=True)` and `onnx.save_model(...,
/// save_as_external_data=True)` write them) are read from their files,
/// relative to the model's folder ([`inline_external_data`]).
pub fn import_file(path: &Path) -> Result<ImportedModel, ImportError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImportError::NotOnnx {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    import_with(&bytes, &file, Some(base))
}

/// Import an ONNX model from its serialised bytes; `source` names the model
/// in error messages (usually its path). A model with external data needs
/// its folder: use [`import_file`].
pub fn import_bytes(bytes: &[u8], source: &str) -> Result<ImportedModel, ImportError> {
    import_with(bytes, source, None)
}

/// Replace every tensor of `model` stored as external data (initializers
/// and the tensors of node attributes, subgraphs included) by its bytes,
/// read from `location` (relative to `base`, inside it) at `offset` for
/// `length` bytes (default: to the end of the file). A missing or short file,
/// a location outside `base`, or no `base` is an error naming the tensor and
/// the file.
pub fn inline_external_data(model: &mut pb::ModelProto, base: Option<&Path>) -> Result<(), String> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    if let Some(g) = model.graph.as_mut() {
        inline_graph(g, base, &mut files)?;
    }
    Ok(())
}

fn inline_graph(
    g: &mut pb::GraphProto,
    base: Option<&Path>,
    files: &mut HashMap<String, Vec<u8>>,
) -> Result<(), String> {
    for t in &mut g.initializer {
        inline_tensor(t, base, files)?;
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if let Some(t) = a.t.as_mut() {
                inline_tensor(t, base, files)?;
            }
            for t in &mut a.tensors {
                inline_tensor(t, base, files)?;
            }
            if let Some(sub) = a.g.as_mut() {
                inline_graph(sub, base, files)?;
            }
            for sub in &mut a.graphs {
                inline_graph(sub, base, files)?;
            }
        }
    }
    Ok(())
}

fn inline_tensor(
    t: &mut TensorProto,
    base: Option<&Path>,
    files: &mut HashMap<String, Vec<u8>>,
) -> Result<(), String> {
    let external = !t.external_data.is_empty()
        || t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
    if !external {
        return Ok(());
    }
    let what = format!("tensor '{}'", t.name);
    let entry = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let location = entry("location")
        .ok_or_else(|| format!("{what}: its data is external but has no 'location'"))?;
    let number = |key: &str| -> Result<Option<usize>, String> {
        entry(key)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("{what}: external data '{key}' is not a number: '{v}'"))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?;
    let base = base.ok_or_else(|| {
        format!("{what}: its data is in the external file '{location}', and the model's folder is unknown (import the model from its file)")
    })?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "{what}: external data location '{location}' is not a path inside the model's folder"
        ));
    }
    let path = base.join(rel);
    if !files.contains_key(&location) {
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "{what}: cannot read its external data file {} ({e})",
                path.display()
            )
        })?;
        files.insert(location.clone(), bytes);
    }
    let bytes = &files[&location];
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(bytes.len()),
    };
    let Some(end) = end.filter(|&e| e <= bytes.len() && offset <= e) else {
        return Err(format!(
            "{what}: its external data is bytes {offset}..{} of {}, which has {} bytes",
            length.map_or("end".into(), |l| (offset + l).to_string()),
            path.display(),
            bytes.len()
        ));
    };
    t.raw_data = bytes[offset..end].to_vec();
    t.external_data.clear();
    t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
    Ok(())
}

fn import_with(
    bytes: &[u8],
    source: &str,
    base: Option<&Path>,
) -> Result<ImportedModel, ImportError> {
    let not_onnx = |reason: String| ImportError::NotOnnx {
        file: source.into(),
        reason,
    };
    let mut model = pb::ModelProto::decode(bytes)
        .map_err(|e| not_onnx(format!("protobuf decoding failed: {e}")))?;
    inline_external_data(&mut model, base).map_err(|msg| ImportError::Model {
        file: source.into(),
        msg,
    })?;
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
        seqs: HashMap::new(),
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
        // import_file reads external data before decoding.
        return Err(
            "its data is stored externally and was not read (import the model from its file)"
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
    /// ONNX sequence values (SplitToSequence's output) -> their tensors;
    /// SequenceAt reads them with a constant position.
    seqs: HashMap<String, Vec<NodeId>>,
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
            if name.is_empty() || self.seqs.contains_key(name) {
                // Absent, or a sequence (its loader reads `seqs`).
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
            if name.is_empty() || self.seqs.contains_key(name) {
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

    /// Import one node by its op type's loader ([`loaders`]).
    fn convert(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        match loaders().get(c.node.op_type.as_str()) {
            Some(load) => load(self, c),
            None => Err(NodeError::Unsupported),
        }
    }
}

/// Builds the nodes of one ONNX node: its outputs, in order (an output
/// the loader does not produce is an error if the node names it).
type Loader = for<'i, 'a, 'c> fn(&mut Importer<'i>, &Ctx<'c>) -> R<Vec<NodeId>>;

/// Every supported ONNX op type and its loader: the families' tables.
fn loaders() -> &'static HashMap<&'static str, Loader> {
    static TABLE: std::sync::OnceLock<HashMap<&'static str, Loader>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = HashMap::new();
        for family in [
            constants::LOADERS,
            elementwise::LOADERS,
            layout::LOADERS,
            linalg::LOADERS,
            nn::LOADERS,
            pool::LOADERS,
            reduce::LOADERS,
        ] {
            for (name, load) in family {
                let dup = t.insert(*name, *load);
                assert!(dup.is_none(), "ONNX op '{name}' has two loaders");
            }
        }
        t
    })
}

/// The ONNX op types the importer supports, sorted.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = loaders().keys().copied().collect();
    v.sort_unstable();
    v
}
