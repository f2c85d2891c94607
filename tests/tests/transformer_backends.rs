//! The GPT-style language model (`metac_compiler::models::transformer`)
//! exported to ONNX with its loss gradient, run in f32 by ONNX Runtime (fused
//! and op by op) and by tract, against the f64 reference interpreter.

use std::collections::HashMap;

use metac_compiler::metatest::to_onnx;
use metac_compiler::models::transformer::{Gpt, GptConfig};
use metac_graphs::autodiff::grad;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, Tensor};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::tensor::HostTensor;

#[test]
fn the_language_model_and_its_gradient_agree_across_backends() {
    let m = Gpt::new(GptConfig {
        vocab: 11,
        context: 8,
        width: 16,
        layers: 2,
        heads: 4,
        mlp_ratio: 4,
        tied_head: false,
        moe: None,
        swiglu: None,
    })
    .unwrap();
    let (b, t) = (3, 8);
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[b, t]);
    let targets = g.input("targets", DType::I64, &[b, t]);
    let weights = g.input("weights", DType::F32, &[b, t]);
    let loss = m.loss(&mut g, &params, tokens, targets, weights);
    let grads = grad(&mut g, loss, &params);
    g.output("loss", loss);
    let names: Vec<String> = m.param_shapes().into_iter().map(|(n, _)| n).collect();
    for (n, &d) in names.iter().zip(&grads) {
        g.output(&format!("grad.{n}"), d);
    }
    // GPT-2's initialisation, scaled up so that attention is not uniform.
    let mut feeds: Vec<(String, Tensor)> = names
        .iter()
        .cloned()
        .zip(m.init_params(7).into_iter().map(|p| {
            let v = p.as_f32().unwrap().iter().map(|x| x * 5.0).collect();
            Tensor::f32(&p.shape, v)
        }))
        .collect();
    let toks: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % 11) as i64).collect();
    let next: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 1) % 11) as i64).collect();
    feeds.push(("tokens".into(), Tensor::i64(&[b, t], toks)));
    feeds.push(("targets".into(), Tensor::i64(&[b, t], next)));
    feeds.push(("weights".into(), Tensor::f32(&[b, t], vec![1.0; b * t])));
    let reference: HashMap<String, Value> = eval_graph(
        &g,
        &feeds
            .iter()
            .map(|(n, t)| (n.clone(), Value::from_tensor(t)))
            .collect(),
    )
    .unwrap()
    .into_iter()
    .collect();
    let onnx = to_onnx(&g, "gpt").unwrap();
    let host: Vec<(String, HostTensor)> = feeds
        .iter()
        .map(|(n, t)| (n.clone(), HostTensor::from_graph(t)))
        .collect();
    for (choice, unfused) in [
        (BackendChoice::Ort, false),
        (BackendChoice::Ort, true),
        (BackendChoice::Tract, false),
    ] {
        let backend = open_backend(&BackendOptions {
            choice,
            unfused,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{choice} (pip install -r requirements.txt): {e:#}"));
        let mut s = backend.load(&onnx, "gpt").unwrap();
        let refs: Vec<(&str, &HostTensor)> = host.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let out: HashMap<String, HostTensor> = s.run(&refs).unwrap().into_iter().collect();
        for (name, want) in &reference {
            let got: Vec<f64> = out[name]
                .as_f32()
                .unwrap()
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let want: Vec<f64> = want.f().iter().copied().collect();
            let scale = want.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-6);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                err <= 1e-4 * scale,
                "{choice} (unfused {unfused}): {name} differs by {err} (scale {scale})"
            );
        }
        let l = out["loss"].to_scalar_f32().unwrap();
        assert!(l > 0.5 && l.is_finite(), "{choice}: loss {l}");
    }
}
