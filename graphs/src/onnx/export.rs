//! Lowering of the IR to ONNX. Each op becomes one standard ONNX node (plus
//! constant initializers for shape/axis operands). Output bytes depend only
//! on the graph: names are derived from node indices and every collection is
//! emitted in node order.

use std::collections::HashMap;

use prost::Message;

use super::pb::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use super::{IR_VERSION, OPSET};
use crate::graph::{Graph, NodeId};
use crate::ops::{ConvParams, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Tensor, TensorData, TensorType};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("graph input name '{0}' collides with a generated value name (names starting with '_n' or '_c' are reserved)")]
    ReservedName(String),
    #[error("graph has no outputs")]
    NoOutputs,
    #[error("graph output '{0}' has the name of a graph input (ONNX names must be unique)")]
    OutputShadowsInput(String),
}

pub fn onnx_dtype(d: DType) -> i32 {
    match d {
        DType::F32 => 1,
        DType::I64 => 7,
        DType::Bool => 9,
    }
}

pub fn tensor_proto(name: &str, t: &Tensor) -> TensorProto {
    let raw: Vec<u8> = match &t.data {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
    };
    TensorProto {
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: onnx_dtype(t.dtype()),
        name: name.into(),
        raw_data: raw,
        ..Default::default()
    }
}

pub fn value_info(name: &str, ty: &TensorType) -> ValueInfoProto {
    let dims = ty
        .shape
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: onnx_dtype(ty.dtype),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}

fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

struct Lowering<'a> {
    g: &'a Graph,
    names: Vec<String>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Shape/axis constants shared by content.
    consts: HashMap<Vec<i64>, String>,
}

impl Lowering<'_> {
    fn name(&self, id: NodeId) -> String {
        self.names[id.index()].clone()
    }

    fn i64_const(&mut self, v: &[i64]) -> String {
        if let Some(n) = self.consts.get(v) {
            return n.clone();
        }
        let name = format!("_c{}", self.consts.len());
        self.inits
            .push(tensor_proto(&name, &Tensor::i64(&[v.len()], v.to_vec())));
        self.consts.insert(v.to_vec(), name.clone());
        name
    }

    fn emit(&mut self, op_type: &str, inputs: Vec<String>, out: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![out.into()],
            name: out.into(),
            op_type: op_type.into(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A float scalar as a Constant node named `{out}_{tag}`.
    fn f32_scalar(&mut self, out: &str, tag: &str, v: f32) -> String {
        let name = format!("{out}_{tag}");
        let t = Tensor::f32(&[], vec![v]);
        self.emit(
            "Constant",
            vec![],
            &name,
            vec![attr_tensor("value", tensor_proto("", &t))],
        );
        name
    }

    /// `asinh` from Log and Sqrt: ONNX Runtime's CPU Asinh kernel is a
    /// scalar loop about 50x slower than its vectorized elementwise kernels
    /// (2.6 ms against ~40 us for 64k elements), and the HierarchicalRNN
    /// applies it to every parameter at every step.
    /// `asinh(x) = sign(x) log(|x| + sqrt(x^2 + 1))`, which loses relative
    /// precision as |x| -> 0 (the sum rounds near 1), so below 0.1 the
    /// series `x (1 - x^2/6 + 3x^4/40)` is used (truncation < 5e-8
    /// relative there; the log form is within ~1e-6 above).
    fn lower_asinh(&mut self, x: &str, out: &str) {
        let t = |k: &str| format!("{out}_{k}");
        let one = self.f32_scalar(out, "one", 1.0);
        let c6 = self.f32_scalar(out, "c6", -1.0 / 6.0);
        let c40 = self.f32_scalar(out, "c40", 3.0 / 40.0);
        let cut = self.f32_scalar(out, "cut", 0.1);
        let x = x.to_string();
        self.emit("Abs", vec![x.clone()], &t("abs"), vec![]);
        self.emit("Mul", vec![x.clone(), x.clone()], &t("x2"), vec![]);
        self.emit("Add", vec![t("x2"), one.clone()], &t("x2p1"), vec![]);
        self.emit("Sqrt", vec![t("x2p1")], &t("root"), vec![]);
        self.emit("Add", vec![t("abs"), t("root")], &t("arg"), vec![]);
        self.emit("Log", vec![t("arg")], &t("log"), vec![]);
        self.emit("Sign", vec![x.clone()], &t("sign"), vec![]);
        self.emit("Mul", vec![t("sign"), t("log")], &t("big"), vec![]);
        self.emit("Mul", vec![t("x2"), c40], &t("p1"), vec![]);
        self.emit("Add", vec![t("p1"), c6], &t("p2"), vec![]);
        self.emit("Mul", vec![t("x2"), t("p2")], &t("p3"), vec![]);
        self.emit("Add", vec![t("p3"), one], &t("p4"), vec![]);
        self.emit("Mul", vec![x, t("p4")], &t("small"), vec![]);
        self.emit("Less", vec![t("abs"), cut], &t("near0"), vec![]);
        self.emit("Where", vec![t("near0"), t("small"), t("big")], out, vec![]);
    }

    fn lower_custom(&mut self, c: &CustomNode) {
        let out: Vec<String> = c.outputs.iter().map(|&o| self.name(o)).collect();
        self.nodes.push(NodeProto {
            input: c.inputs.iter().map(|&i| self.name(i)).collect(),
            name: format!("{}_{}", out[0], c.op_type),
            output: out,
            op_type: c.op_type.clone(),
            domain: c.domain.clone(),
            attribute: c.attributes.clone(),
            ..Default::default()
        });
    }

    fn shape_operand(&mut self, s: &[usize]) -> String {
        let v: Vec<i64> = s.iter().map(|&d| d as i64).collect();
        self.i64_const(&v)
    }

    fn conv_attrs(p: &ConvParams, w: &TensorType) -> Vec<AttributeProto> {
        vec![
            attr_ints("dilations", &p.dilation),
            attr_int("group", p.group as i64),
            attr_ints("kernel_shape", &w.shape[2..]),
            attr_ints("pads", &p.pads),
            attr_ints("strides", &p.stride),
        ]
    }

    fn lower(&mut self, id: NodeId) {
        let node = self.g.node(id);
        let out = self.name(id);
        let ins: Vec<String> = node.inputs.iter().map(|&i| self.name(i)).collect();
        match &node.op {
            Op::Input { .. } => {}
            // Float constants become Constant nodes, not initializers: importers
            // (ours included) take float initializers to be a model's parameters.
            Op::Const(t) if t.dtype() == DType::F32 => self.emit(
                "Constant",
                vec![],
                &out,
                vec![attr_tensor("value", tensor_proto("", t))],
            ),
            Op::Const(t) => self.inits.push(tensor_proto(&out, t)),
            Op::Fill { value, ty } => {
                let one = Tensor {
                    shape: vec![1],
                    data: match ty.dtype {
                        DType::F32 => TensorData::F32(vec![*value as f32]),
                        DType::I64 => TensorData::I64(vec![*value as i64]),
                        DType::Bool => TensorData::Bool(vec![*value != 0.0]),
                    },
                };
                if ty.numel() <= 16 {
                    // Small fills are cheaper as plain constants than as ConstantOfShape.
                    let full = crate::eval::Value::fill(*value, ty).to_tensor();
                    self.emit(
                        "Constant",
                        vec![],
                        &out,
                        vec![attr_tensor("value", tensor_proto("", &full))],
                    );
                } else {
                    let s = self.shape_operand(&ty.shape);
                    self.emit(
                        "ConstantOfShape",
                        vec![s],
                        &out,
                        vec![attr_tensor("value", tensor_proto("", &one))],
                    );
                }
            }
            Op::Where if node.ty.dtype == DType::Bool => {
                // ONNX Runtime has no bool kernel for Where: (c and a) or (not c and b).
                let (ca, nc, ncb) = (
                    format!("{out}_ca"),
                    format!("{out}_nc"),
                    format!("{out}_ncb"),
                );
                self.emit("And", vec![ins[0].clone(), ins[1].clone()], &ca, vec![]);
                self.emit("Not", vec![ins[0].clone()], &nc, vec![]);
                self.emit("And", vec![nc, ins[2].clone()], &ncb, vec![]);
                self.emit("Or", vec![ca, ncb], &out, vec![]);
            }
            Op::Unary(UnaryOp::Asinh) => self.lower_asinh(&ins[0], &out),
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::MatMul => {
                self.emit(node.op.name(), ins, &out, vec![])
            }
            Op::Cast(to) => self.emit(
                "Cast",
                ins,
                &out,
                vec![attr_int("to", onnx_dtype(*to) as i64)],
            ),
            Op::StopGradient => self.emit("Identity", ins, &out, vec![]),
            Op::Reduce { op, axes, keepdims } => {
                if axes.is_empty() {
                    // Reducing over no axes is the identity (ONNX would reduce all).
                    return self.emit("Identity", ins, &out, vec![]);
                }
                let keep = attr_int("keepdims", *keepdims as i64);
                match op {
                    ReduceOp::Sum => {
                        let a: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                        let a = self.i64_const(&a);
                        self.emit("ReduceSum", vec![ins[0].clone(), a], &out, vec![keep]);
                    }
                    ReduceOp::Mean | ReduceOp::Max => {
                        self.emit(
                            node.op.name(),
                            ins,
                            &out,
                            vec![attr_ints("axes", axes), keep],
                        );
                    }
                }
            }
            Op::Reshape(s) => {
                let s = self.shape_operand(s);
                self.emit("Reshape", vec![ins[0].clone(), s], &out, vec![]);
            }
            Op::Expand(s) => {
                let s = self.shape_operand(s);
                self.emit("Expand", vec![ins[0].clone(), s], &out, vec![]);
            }
            Op::Transpose(p) => self.emit("Transpose", ins, &out, vec![attr_ints("perm", p)]),
            Op::Concat { axis } => {
                self.emit("Concat", ins, &out, vec![attr_int("axis", *axis as i64)])
            }
            Op::Slice { axis, start, end } => {
                let s = self.i64_const(&[*start as i64]);
                let e = self.i64_const(&[*end as i64]);
                let a = self.i64_const(&[*axis as i64]);
                self.emit("Slice", vec![ins[0].clone(), s, e, a], &out, vec![]);
            }
            Op::Gather { axis } => {
                self.emit("Gather", ins, &out, vec![attr_int("axis", *axis as i64)])
            }
            Op::ScatterAdd => {
                // ScatterND indexes rows with `[k, 1]` indices.
                let k = self.g.shape(node.inputs[1])[0];
                let s = self.shape_operand(&[k, 1]);
                let rows = format!("{out}_rows");
                self.emit("Reshape", vec![ins[1].clone(), s], &rows, vec![]);
                self.emit(
                    "ScatterND",
                    vec![ins[0].clone(), rows, ins[2].clone()],
                    &out,
                    vec![attr_string("reduction", "add")],
                );
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => self.emit(
                node.op.name(),
                ins,
                &out,
                vec![attr_int("axis", *axis as i64)],
            ),
            Op::Conv2d(p) => {
                let attrs = Self::conv_attrs(p, self.g.ty(node.inputs[1]));
                self.emit("Conv", ins, &out, attrs);
            }
            Op::ConvTranspose2d {
                params,
                output_padding,
            } => {
                let mut attrs = Self::conv_attrs(params, self.g.ty(node.inputs[1]));
                attrs.insert(3, attr_ints("output_padding", output_padding));
                self.emit("ConvTranspose", ins, &out, attrs);
            }
        }
    }
}

/// Lower a graph to an ONNX model. Only the nodes its outputs need are
/// emitted; every `Input` node becomes a graph input, in creation order.
pub fn export_model(g: &Graph, graph_name: &str) -> Result<ModelProto, ExportError> {
    export_with_custom_nodes(g, graph_name, &[])
}

/// A group of IR nodes written as one node of a custom ONNX domain: the
/// export hook of passes that replace subgraphs by kernels of their own
/// (fusion writes its clusters so, `crate::fusion::fuse_onnx`).
#[derive(Clone, Debug)]
pub struct CustomNode {
    /// The IR nodes it stands for, in topological order.
    pub members: Vec<NodeId>,
    /// The values it reads (from outside `members`).
    pub inputs: Vec<NodeId>,
    /// The members it outputs (read outside the group or by the graph's
    /// outputs).
    pub outputs: Vec<NodeId>,
    pub domain: String,
    pub op_type: String,
    pub attributes: Vec<AttributeProto>,
}

/// [`export_model`], with each custom node written in place of its members
/// (and its domain imported at version 1). Not standard ONNX: only an
/// engine with the domain's kernels registered can run it.
pub fn export_with_custom_nodes(
    g: &Graph,
    graph_name: &str,
    custom: &[CustomNode],
) -> Result<ModelProto, ExportError> {
    export_with_clusters(g, graph_name, custom)
}

/// Which nodes the outputs need, each cluster reading its own inputs (a
/// slice that a cluster reads in place is not needed for it).
fn live_units(g: &Graph, clusters: &[CustomNode]) -> Vec<bool> {
    let mut cluster_of: Vec<Option<usize>> = vec![None; g.len()];
    for (c, cl) in clusters.iter().enumerate() {
        for m in &cl.members {
            cluster_of[m.index()] = Some(c);
        }
    }
    let mut live = vec![false; g.len()];
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(x) = stack.pop() {
        if live[x.index()] {
            continue;
        }
        match cluster_of[x.index()] {
            Some(c) => {
                for m in &clusters[c].members {
                    live[m.index()] = true;
                }
                stack.extend(&clusters[c].inputs);
            }
            None => {
                live[x.index()] = true;
                stack.extend(&g.node(x).inputs);
            }
        }
    }
    live
}

/// The order in which to emit the live nodes, each cluster as one unit: a
/// topological order of the units (the clusters stay acyclic when each is
/// one node, so one exists), otherwise node order.
fn emission_order(g: &Graph, live: &[bool], clusters: &[CustomNode]) -> Vec<Unit> {
    let mut unit_of: Vec<Option<usize>> = vec![None; g.len()];
    let mut units: Vec<Unit> = vec![];
    for (c, cl) in clusters.iter().enumerate() {
        for m in &cl.members {
            unit_of[m.index()] = Some(units.len());
        }
        units.push(Unit::Cluster(c));
    }
    for (i, &l) in live.iter().enumerate() {
        if l && unit_of[i].is_none() {
            unit_of[i] = Some(units.len());
            units.push(Unit::Node(NodeId(i as u32)));
        }
    }
    // Kahn's algorithm, smallest first node first, so that the output is
    // node order wherever the clusters allow it.
    let first = |u: &Unit| match u {
        Unit::Node(n) => *n,
        Unit::Cluster(c) => clusters[*c].members[0],
    };
    let mut deps: Vec<Vec<usize>> = vec![vec![]; units.len()];
    let mut pending = vec![0usize; units.len()];
    for (u, unit) in units.iter().enumerate() {
        let reads: &[NodeId] = match unit {
            Unit::Node(n) => &g.node(*n).inputs,
            Unit::Cluster(c) => &clusters[*c].inputs,
        };
        for x in reads {
            let p = unit_of[x.index()].expect("inputs of live units are live");
            if p != u && !deps[p].contains(&u) {
                deps[p].push(u);
                pending[u] += 1;
            }
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<(NodeId, usize)>> = units
        .iter()
        .enumerate()
        .filter(|(u, _)| pending[*u] == 0)
        .map(|(u, x)| std::cmp::Reverse((first(x), u)))
        .collect();
    let mut order = vec![];
    while let Some(std::cmp::Reverse((_, u))) = ready.pop() {
        order.push(units[u]);
        for &v in &deps[u] {
            pending[v] -= 1;
            if pending[v] == 0 {
                ready.push(std::cmp::Reverse((first(&units[v]), v)));
            }
        }
    }
    assert_eq!(order.len(), units.len(), "fused clusters must be convex");
    order
}

#[derive(Clone, Copy)]
enum Unit {
    Node(NodeId),
    Cluster(usize),
}

fn export_with_clusters(
    g: &Graph,
    graph_name: &str,
    clusters: &[CustomNode],
) -> Result<ModelProto, ExportError> {
    if g.outputs().is_empty() {
        return Err(ExportError::NoOutputs);
    }
    let inputs = g.inputs();
    for (n, _) in &inputs {
        if n.starts_with("_n") || n.starts_with("_c") {
            return Err(ExportError::ReservedName(n.clone()));
        }
    }
    if let Some((n, _)) = g
        .outputs()
        .iter()
        .find(|(n, _)| inputs.iter().any(|(i, _)| i == n))
    {
        return Err(ExportError::OutputShadowsInput(n.clone()));
    }
    // A node that is an output (first mention, not an input or constant)
    // takes the output's name directly; the others go through Identity.
    let mut direct: HashMap<NodeId, String> = HashMap::new();
    for (name, id) in g.outputs() {
        let n = g.node(*id);
        let plain = !matches!(n.op, Op::Input { .. } | Op::Const(_) | Op::Fill { .. });
        if plain && !direct.contains_key(id) && !inputs.iter().any(|(i, _)| i == name) {
            direct.insert(*id, name.clone());
        }
    }
    let names = g
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| match &n.op {
            Op::Input { name } => name.clone(),
            _ => direct
                .get(&NodeId(i as u32))
                .cloned()
                .unwrap_or_else(|| format!("_n{i}")),
        })
        .collect();
    let mut l = Lowering {
        g,
        names,
        nodes: vec![],
        inits: vec![],
        consts: HashMap::new(),
    };
    let roots: Vec<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let live = if clusters.is_empty() {
        crate::passes::dce::live_nodes(g, &roots)
    } else {
        live_units(g, clusters)
    };
    for unit in emission_order(g, &live, clusters) {
        match unit {
            Unit::Node(id) => l.lower(id),
            Unit::Cluster(c) => l.lower_custom(&clusters[c]),
        }
    }
    for (name, id) in g.outputs() {
        if direct.get(id) != Some(name) {
            let src = l.name(*id);
            l.emit("Identity", vec![src], name, vec![]);
        }
    }
    let graph = GraphProto {
        name: graph_name.into(),
        node: l.nodes,
        initializer: l.inits,
        input: inputs
            .iter()
            .map(|(n, id)| value_info(n, g.ty(*id)))
            .collect(),
        output: g
            .outputs()
            .iter()
            .map(|(n, id)| value_info(n, g.ty(*id)))
            .collect(),
        ..Default::default()
    };
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
    }];
    for c in clusters {
        if !opset_import.iter().any(|o| o.domain == c.domain) {
            opset_import.push(OperatorSetIdProto {
                domain: c.domain.clone(),
                version: 1,
            });
        }
    }
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import,
        producer_name: "metac".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    })
}

/// Serialise a graph as ONNX bytes.
pub fn export_bytes(g: &Graph, graph_name: &str) -> Result<Vec<u8>, ExportError> {
    Ok(export_model(g, graph_name)?.encode_to_vec())
}

/// ONNX models are protobuf messages, which cannot exceed 2 GiB; a model
/// past this size keeps its large tensors in an external data file
/// ([`externalize_data`]).
pub const PROTOBUF_LIMIT: usize = 2_000_000_000;

/// Alignment of tensors in an external data file (ONNX Runtime maps
/// page-aligned data instead of copying it).
const EXTERNAL_ALIGN: usize = 4096;

/// Move the data of every tensor of `model` (initializers and the values of
/// Constant nodes) of at least `min_bytes` into one external data file,
/// named `location` relative to the model's file, as ONNX defines external
/// data: each tensor keeps its name, type and shape, and records the file,
/// its offset (4 KiB-aligned) and its length. Returns the file's bytes.
pub fn externalize_data(model: &mut ModelProto, location: &str, min_bytes: usize) -> Vec<u8> {
    let mut data = vec![];
    let take = |t: &mut TensorProto, data: &mut Vec<u8>| {
        if t.raw_data.len() < min_bytes.max(1) {
            return;
        }
        let offset = data.len().next_multiple_of(EXTERNAL_ALIGN);
        data.resize(offset, 0);
        let raw = std::mem::take(&mut t.raw_data);
        data.extend_from_slice(&raw);
        t.data_location = Some(super::pb::tensor_proto::DataLocation::External as i32);
        t.external_data = [
            ("location", location.to_string()),
            ("offset", offset.to_string()),
            ("length", raw.len().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| super::pb::StringStringEntryProto {
            key: k.into(),
            value: v,
        })
        .collect();
    };
    if let Some(g) = model.graph.as_mut() {
        for t in &mut g.initializer {
            take(t, &mut data);
        }
        for n in &mut g.node {
            let out = n.output.first().cloned().unwrap_or_default();
            for a in &mut n.attribute {
                if let Some(t) = a.t.as_mut() {
                    if t.name.is_empty() {
                        t.name = out.clone();
                    }
                    take(t, &mut data);
                }
            }
        }
    }
    data
}
