//! Exported derivative graphs on real backends: for every op case, the
//! graph with its gradient, both HVPs and the third-order term is exported
//! to ONNX, run in f32 by ONNX Runtime and by tract, and compared with the
//! f64 reference interpreter; the backends must also agree with each other.
//! Every exported file passes the `onnx` package's checker.

use std::collections::HashMap;

use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::onnx::export_bytes;
use metac_graphs::passes::optimize;
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions, Session};
use metac_runtime::tensor::HostTensor;
use metac_tests::fixtures::rel_err as rel;
use metac_tests::op_cases::{cases, harness, harness_inputs, rng};
use metac_tests::python::{run_script, scratch};

fn to_host(v: &Value) -> HostTensor {
    match v {
        Value::F(a) => HostTensor::F32(a.mapv(|x| x as f32)),
        Value::I(a) => HostTensor::I64(a.clone()),
        Value::B(a) => HostTensor::Bool(a.clone()),
    }
}

fn f64s(t: &HostTensor) -> Vec<f64> {
    t.as_f32().unwrap().iter().map(|&x| x as f64).collect()
}

fn run(s: &mut dyn Session, inputs: &[(String, HostTensor)]) -> HashMap<String, HostTensor> {
    let refs: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run(&refs).unwrap().into_iter().collect()
}

#[test]
fn every_op_case_runs_on_ort_and_tract_and_matches_the_f64_reference() {
    let ort = open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        ..Default::default()
    })
    .expect("ONNX Runtime must be installed for the tests: pip install -r requirements.txt");
    let tract = open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap();
    let dir = scratch("op-cases");
    let mut files = vec![];
    let mut failures = vec![];
    for c in cases() {
        let mut r = rng(11);
        let h = harness(&c, &mut r);
        let g = optimize(&h.g);
        let bytes = export_bytes(&g, c.name).unwrap();
        assert_eq!(
            bytes,
            export_bytes(&optimize(&h.g), c.name).unwrap(),
            "{}: export is not deterministic",
            c.name
        );
        let path = dir.join(format!("{}.onnx", c.name));
        std::fs::write(&path, &bytes).unwrap();
        files.push(path);
        let env: Vec<(String, Value)> = harness_inputs(&c, &h, &mut r);
        let reference: HashMap<String, Value> = eval_graph(&g, &env.iter().cloned().collect())
            .unwrap()
            .into_iter()
            .collect();
        let host: Vec<(String, HostTensor)> =
            env.iter().map(|(n, v)| (n.clone(), to_host(v))).collect();
        let o = run(ort.load(&bytes, c.name).unwrap().as_mut(), &host);
        let t = run(tract.load(&bytes, c.name).unwrap().as_mut(), &host);
        for (name, want) in &reference {
            let want: Vec<f64> = want.f().iter().copied().collect();
            let (a, b) = (f64s(&o[name]), f64s(&t[name]));
            let (ea, eb, eab) = (rel(&a, &want), rel(&b, &want), rel(&a, &b));
            if ea > 1e-3 || eb > 1e-3 || eab > 1e-4 {
                failures.push(format!("{} output {name}: ort vs f64 {ea:.2e}, tract vs f64 {eb:.2e}, ort vs tract {eab:.2e}", c.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let out = run_script("check_onnx.py", &refs);
    assert!(
        out.contains(&format!("{} passed, 0 failed", files.len())),
        "{out}"
    );
}
