//! The importer's pooling, LRN and hard-activation ops reproduce ONNX
//! Runtime's outputs (`tests/fixtures/onnx/pool_ops.ref.json`, made by
//! `make_pool_refs.py` over their attributes: pads including asymmetric
//! ones, strides, dilations, ceil_mode, count_include_pad, auto_pad, 1-D),
//! in the reference interpreter and, exported back to ONNX, in ONNX Runtime
//! and tract. Their derivatives are checked in `gradcheck.rs`.

use std::collections::HashMap;

use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::onnx::{export_bytes, import_bytes};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::tensor::HostTensor;
use metac_tests::fixtures::{f32_array, op_cases, rel_err};
use ndarray::{ArrayD, IxDyn};

#[test]
fn pooling_lrn_and_hard_activations_match_onnx_runtime() {
    let backends: Vec<_> = [BackendChoice::Ort, BackendChoice::Tract]
        .into_iter()
        .map(|choice| {
            open_backend(&BackendOptions {
                choice,
                ..Default::default()
            })
            .expect("backend (ONNX Runtime must be installed: pip install -r requirements.txt)")
        })
        .collect();
    let cases = op_cases();
    assert!(cases.len() >= 15, "{} cases", cases.len());
    let mut failures = vec![];
    for c in &cases {
        let m = import_bytes(&c.model, &c.name).unwrap_or_else(|e| panic!("{e}"));
        let x = Value::F(ArrayD::from_shape_vec(IxDyn(&c.x_shape), c.x.clone()).unwrap());
        let out: HashMap<String, Value> = eval_graph(&m.graph, &HashMap::from([("x".into(), x)]))
            .unwrap()
            .into_iter()
            .collect();
        let y = &out["y"];
        let mut got = vec![(
            "interpreter",
            y.shape().to_vec(),
            y.f().iter().copied().collect(),
        )];
        let bytes = export_bytes(&m.graph, &c.name).unwrap();
        let feed = HostTensor::F32(f32_array(&c.x_shape, &c.x));
        for (b, name) in backends.iter().zip(["onnxruntime", "tract"]) {
            let mut s = b.load(&bytes, &c.name).unwrap();
            let o = s.run(&[("x", &feed)]).unwrap();
            let t = &o.iter().find(|(n, _)| n == "y").unwrap().1;
            let v: Vec<f64> = t.as_f32().unwrap().iter().map(|&v| v as f64).collect();
            got.push((name, t.shape().to_vec(), v));
        }
        for (by, shape, v) in got {
            let err = rel_err(&v, &c.y);
            if shape != c.y_shape || err > 1e-6 {
                failures.push(format!(
                    "{} ({}) in {by}: shape {shape:?} (want {:?}), rel err {err:.2e}",
                    c.name, c.op, c.y_shape
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
