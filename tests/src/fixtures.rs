//! The PyTorch-exported ONNX fixtures and their autograd references
//! (`tests/fixtures/onnx/`, made by `make_fixtures.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("onnx")
}

/// Models that have a scalar `loss` output and a full reference.
pub const LOSS_MODELS: &[&str] = &[
    "mlp_ce_opset18",
    "mlp_ce_opset20",
    "convnet_opset18",
    "transformer_block_opset18",
    "transformer_block_opset20",
    "poolnet_opset18",
    "groupnet_opset18",
    "poolnet_dynamo_opset18",
];

pub struct Reference {
    pub inputs: BTreeMap<String, (Vec<usize>, Vec<f64>, bool)>,
    pub params: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    pub loss: f64,
    pub grad: BTreeMap<String, Vec<f64>>,
    pub v: BTreeMap<String, Vec<f64>>,
    pub hvp: BTreeMap<String, Vec<f64>>,
}

fn nums(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn map(v: &serde_json::Value) -> BTreeMap<String, Vec<f64>> {
    v.as_object()
        .map(|o| o.iter().map(|(k, x)| (k.clone(), nums(x))).collect())
        .unwrap_or_default()
}

pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(dir().join(format!("{name}.ref.json"))).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let inputs = j["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            let is_int = t["dtype"].as_str().is_some_and(|d| d.starts_with("int"));
            (k.clone(), (shape(&t["shape"]), nums(&t["data"]), is_int))
        })
        .collect();
    let params = j["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), (shape(&t["shape"]), nums(&t["data"]))))
        .collect();
    Reference {
        inputs,
        params,
        loss: j["loss"].as_f64().unwrap_or(f64::NAN),
        grad: map(&j["grad"]),
        v: map(&j["v"]),
        hvp: map(&j["hvp"]),
    }
}

pub fn f32_array(shape: &[usize], data: &[f64]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), data.iter().map(|&x| x as f32).collect()).unwrap()
}

pub fn i64_array(shape: &[usize], data: &[f64]) -> ArrayD<i64> {
    ArrayD::from_shape_vec(IxDyn(shape), data.iter().map(|&x| x as i64).collect()).unwrap()
}

/// Relative L2 error with a floor on the denominator (for tensors whose true
/// value is ~0, such as the gradient of a bias that softmax ignores).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-3);
    num / den
}

/// `||got - want|| <= rtol * ||want|| + atol`: relative where the values are
/// large, absolute where the true value is ~0 (a bias whose gradient softmax
/// cancels exactly leaves only float noise to compare).
pub fn close(got: &[f64], want: &[f64], rtol: f64, atol: f64) -> bool {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    got.len() == want.len() && num <= rtol * den + atol
}

/// One single-op model of `pool_ops.ref.json` (made by
/// `make_pool_refs.py`): the pooling, LRN and hard-activation ops over
/// their attributes, with ONNX Runtime's output (or the ONNX spec's formula
/// where ONNX Runtime refuses the case).
pub struct OpCase {
    pub name: String,
    pub op: String,
    /// The ONNX model: input `x`, output `y`, opset 19.
    pub model: Vec<u8>,
    pub x_shape: Vec<usize>,
    pub x: Vec<f64>,
    pub y_shape: Vec<usize>,
    pub y: Vec<f64>,
}

/// Every case of `pool_ops.ref.json`.
pub fn op_cases() -> Vec<OpCase> {
    use metac_graphs::onnx::pb;
    use prost::Message;
    let text = std::fs::read_to_string(dir().join("pool_ops.ref.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let opset = j["opset"].as_i64().unwrap();
    let vinfo = |name: &str, dims: Option<&[usize]>| pb::ValueInfoProto {
        name: name.into(),
        r#type: dims.map(|dims| pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                                d as i64,
                            )),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let x_shape = shape(&c["shape"]);
            let attribute = c["attrs"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    let mut a = pb::AttributeProto {
                        name: k.clone(),
                        ..Default::default()
                    };
                    if let Some(s) = v.as_str() {
                        (a.s, a.r#type) = (s.as_bytes().to_vec(), 3);
                    } else if let Some(arr) = v.as_array() {
                        a.ints = arr.iter().map(|x| x.as_i64().unwrap()).collect();
                        a.r#type = 7;
                    } else if let Some(i) = v.as_i64() {
                        (a.i, a.r#type) = (i, 2);
                    } else {
                        (a.f, a.r#type) = (v.as_f64().unwrap() as f32, 1);
                    }
                    a
                })
                .collect();
            let op = c["op"].as_str().unwrap().to_string();
            let model = pb::ModelProto {
                ir_version: 9,
                opset_import: vec![pb::OperatorSetIdProto {
                    domain: String::new(),
                    version: opset,
                }],
                graph: Some(pb::GraphProto {
                    name: "case".into(),
                    node: vec![pb::NodeProto {
                        op_type: op.clone(),
                        name: "n".into(),
                        input: vec!["x".into()],
                        output: vec!["y".into()],
                        attribute,
                        ..Default::default()
                    }],
                    input: vec![vinfo("x", Some(&x_shape))],
                    output: vec![vinfo("y", None)],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec();
            OpCase {
                name: c["name"].as_str().unwrap().to_string(),
                op,
                model,
                x: nums(&c["x"]),
                x_shape,
                y_shape: shape(&c["y_shape"]),
                y: nums(&c["y"]),
            }
        })
        .collect()
}
