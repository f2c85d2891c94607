//! `derive` on models exported by PyTorch: the gradient and HVP graphs, run
//! by ONNX Runtime (Rust and Python) and by tract, reproduce PyTorch
//! autograd's values, and the two backends agree with each other.

use std::collections::HashMap;

use metac_compiler::derive::{derive, HvpMode};
use metac_contract::bundle::{BundleBuilder, Port, StateBuffer};
use metac_graphs::onnx::{export_bytes, import_file};
use metac_runtime::backend::{open_backend, Backend, BackendChoice, BackendOptions};
use metac_runtime::tensor::HostTensor;
use metac_tests::fixtures::{self, close, f32_array, i64_array, rel_err, LOSS_MODELS};
use metac_tests::python::{run_script, scratch};

fn backend(choice: BackendChoice) -> Box<dyn Backend> {
    open_backend(&BackendOptions {
        choice,
        ..Default::default()
    })
    .expect("backend (ONNX Runtime must be installed: pip install -r requirements.txt)")
}

fn run(
    b: &dyn Backend,
    bytes: &[u8],
    feeds: &HashMap<String, HostTensor>,
) -> HashMap<String, Vec<f64>> {
    let mut s = b.load(bytes, "derived").unwrap();
    let names = s.input_names();
    let inputs: Vec<(&str, &HostTensor)> = names.iter().map(|n| (n.as_str(), &feeds[n])).collect();
    s.run(&inputs)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.as_f32().unwrap().iter().map(|&x| x as f64).collect()))
        .collect()
}

#[test]
fn derived_graphs_match_pytorch_autograd_on_ort_tract_and_python_ort() {
    let (ort, tract) = (backend(BackendChoice::Ort), backend(BackendChoice::Tract));
    let mut report = vec![];
    for name in LOSS_MODELS {
        let model = import_file(&fixtures::dir().join(format!("{name}.onnx"))).unwrap();
        let r = fixtures::reference(name);
        let wrt: Vec<String> = model.initializers.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(wrt.len(), r.params.len(), "{name}: parameters");
        for mode in [HvpMode::ForwardOverReverse, HvpMode::ReverseOverReverse] {
            let d = derive(&model, "loss", &wrt, mode).unwrap();
            let (gb, hb) = (
                export_bytes(&d.grad, "grad").unwrap(),
                export_bytes(&d.hvp, "hvp").unwrap(),
            );
            let mut feeds: HashMap<String, HostTensor> = HashMap::new();
            for (k, (s, v, is_int)) in &r.inputs {
                feeds.insert(
                    k.clone(),
                    if *is_int {
                        HostTensor::I64(i64_array(s, v))
                    } else {
                        HostTensor::F32(f32_array(s, v))
                    },
                );
            }
            for (k, (s, v)) in &r.params {
                feeds.insert(k.clone(), HostTensor::F32(f32_array(s, v)));
                feeds.insert(format!("v_{k}"), HostTensor::F32(f32_array(s, &r.v[k])));
            }
            let mut worst = 0f64;
            let mut worst_backends = 0f64;
            let mut bad = vec![];
            let (go, gt) = (
                run(ort.as_ref(), &gb, &feeds),
                run(tract.as_ref(), &gb, &feeds),
            );
            let (ho, ht) = (
                run(ort.as_ref(), &hb, &feeds),
                run(tract.as_ref(), &hb, &feeds),
            );
            for out in [&go, &gt] {
                worst = worst.max(rel_err(&out["loss"], &[r.loss]));
                for (k, want) in &r.grad {
                    let got = &out[&format!("grad_{k}")];
                    worst = worst.max(rel_err(got, want));
                    if !close(got, want, 1e-4, 1e-6) {
                        bad.push(format!("grad_{k} vs torch: {:.2e}", rel_err(got, want)));
                    }
                }
            }
            for out in [&ho, &ht] {
                for (k, want) in &r.hvp {
                    let got = &out[&format!("hvp_{k}")];
                    worst = worst.max(rel_err(got, want));
                    if !close(got, want, 1e-4, 1e-6) {
                        bad.push(format!("hvp_{k} vs torch: {:.2e}", rel_err(got, want)));
                    }
                }
            }
            for (a, b) in [(&go, &gt), (&ho, &ht)] {
                for (k, x) in a.iter() {
                    worst_backends = worst_backends.max(rel_err(x, &b[k]));
                    if !close(x, &b[k], 1e-5, 1e-6) {
                        bad.push(format!("{k}: ORT vs tract {:.2e}", rel_err(x, &b[k])));
                    }
                }
            }
            report.push(format!("{name} {mode:?}: worst relative error vs torch {worst:.2e}, ORT vs tract {worst_backends:.2e}"));
            assert!(bad.is_empty(), "{name} {mode:?}: {}", bad.join("; "));
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn derived_bundles_run_in_python_onnxruntime() {
    for name in ["mlp_ce_opset18", "transformer_block_opset20"] {
        let model = import_file(&fixtures::dir().join(format!("{name}.onnx"))).unwrap();
        let wrt: Vec<String> = model.initializers.iter().map(|(n, _)| n.clone()).collect();
        let d = derive(&model, "loss", &wrt, HvpMode::ForwardOverReverse).unwrap();
        let dir = scratch(&format!("derive-py-{name}"));
        let mut b = BundleBuilder::new("derive");
        b.graph("grad", &d.grad)
            .unwrap()
            .graph("hvp", &d.hvp)
            .unwrap();
        for (n, t) in &model.initializers {
            b.init_tensor(n, t.clone()).state(StateBuffer {
                name: n.clone(),
                dtype: "f32".into(),
                shape: t.shape.clone(),
                init: Some(n.clone()),
                reads: vec![Port {
                    graph: "grad".into(),
                    tensor: n.clone(),
                }],
                updated_by: None,
            });
        }
        b.write(&dir).unwrap();
        let ref_json = fixtures::dir().join(format!("{name}.ref.json"));
        let out = run_script("run_derived.py", &[&dir, &ref_json]);
        assert!(out.contains("passed, 0 failed"), "{out}");
        let files = [dir.join("grad.onnx"), dir.join("hvp.onnx")];
        let out = run_script("check_onnx.py", &[&files[0], &files[1]]);
        assert!(out.contains("2 passed, 0 failed"), "{out}");
    }
}
