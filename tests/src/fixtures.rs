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
