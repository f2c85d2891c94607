//! The compiled hyper step of the mixture-of-experts LM (Tiny-ONN) on ONNX
//! Runtime: nothing of the router loss reaches the surprise or the main
//! gradient (bit for bit), and ONNX Runtime agrees with the f64 reference
//! interpreter on every output.

use std::collections::HashMap;

use metac_compiler::metatest::to_onnx;
use metac_compiler::models::baselines::LR_SCALE;
use metac_compiler::models::transformer::Gpt;
use metac_compiler::moe::{build_train_step, ROUTER_KL, ROUTER_K_PENALTY, ROUTER_LR_SCALE};
use metac_contract::moe::MoeLmConfig;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::Tensor;
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::tensor::HostTensor;

const CONFIG: &str = r#"
[model]
context = 12
width = 16
layers = 2
heads = 2
[model.moe]
experts = 4
hidden = 8
budget = 0.6
max_k = 3
[train]
batch = 3
lr = 1e-2
router_lr = 1e-2
[run]
steps = 1
"#;

struct Setup {
    inputs: Vec<(String, Tensor)>,
}

/// Parameters (drawn larger than GPT-2's start, so that every path
/// matters), the optimizers' initial states and a batch of bytes.
fn setup(step: &metac_compiler::moe::MoeTrainStep, c: &MoeLmConfig) -> Setup {
    let gpt = Gpt::new(c.gpt()).unwrap();
    let mut inputs = vec![];
    for (i, t) in gpt.init_params(1).into_iter().enumerate() {
        let name = step.params[i].clone();
        let v: Vec<f32> = t.as_f32().unwrap().iter().map(|x| x * 10.0).collect();
        let v = if name.ends_with(".g") {
            t.as_f32().unwrap().to_vec()
        } else {
            v
        };
        inputs.push((name, Tensor::f32(&t.shape, v)));
    }
    for (n, t) in &step.state {
        inputs.push((n.clone(), t.clone()));
    }
    let (b, t) = (c.train.batch, c.model.context);
    let text = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs";
    let tok: Vec<i64> = (0..b * t).map(|i| i64::from(text[(i * 5) % 60])).collect();
    let tgt: Vec<i64> = (0..b * t)
        .map(|i| i64::from(text[(i * 5) % 60 + 1]))
        .collect();
    inputs.push(("tokens".into(), Tensor::i64(&[b, t], tok)));
    inputs.push(("targets".into(), Tensor::i64(&[b, t], tgt)));
    for n in [LR_SCALE, ROUTER_LR_SCALE] {
        inputs.push((n.into(), Tensor::f32(&[], vec![1.0])));
    }
    Setup { inputs }
}

fn with_router_weights(inputs: &[(String, Tensor)], kl: f32, kp: f32) -> Vec<(String, Tensor)> {
    let mut v = inputs.to_vec();
    v.push((ROUTER_KL.into(), Tensor::f32(&[], vec![kl])));
    v.push((ROUTER_K_PENALTY.into(), Tensor::f32(&[], vec![kp])));
    v
}

#[test]
fn the_router_loss_changes_only_the_routers_and_ort_agrees_with_f64() {
    let c = MoeLmConfig::from_toml_str(CONFIG).unwrap();
    let gpt0 = Gpt::new(c.gpt()).unwrap();
    let step = build_train_step(&gpt0, &c);
    let s = setup(&step, &c);
    assert_eq!(
        step.router_params,
        [
            "l0.moe.router.w",
            "l0.moe.router.b",
            "l1.moe.router.w",
            "l1.moe.router.b"
        ]
    );
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        ..Default::default()
    })
    .expect("ONNX Runtime (pip install -r requirements.txt)");
    let mut sess = backend
        .load(&to_onnx(&step.graph, "moe_train_step").unwrap(), "moe")
        .unwrap();
    let run = |sess: &mut Box<dyn metac_runtime::backend::Session>, ins: &[(String, Tensor)]| {
        let host: Vec<(String, HostTensor)> = ins
            .iter()
            .map(|(n, t)| (n.clone(), HostTensor::from_graph(t)))
            .collect();
        let refs: Vec<(&str, &HostTensor)> = host.iter().map(|(n, t)| (n.as_str(), t)).collect();
        sess.run(&refs)
            .unwrap()
            .into_iter()
            .collect::<HashMap<String, HostTensor>>()
    };
    let a_in = with_router_weights(&s.inputs, 0.0, 0.0);
    let a = run(&mut sess, &a_in);
    let b = run(&mut sess, &with_router_weights(&s.inputs, 1.0, 0.5));
    let routerish = |name: &str| {
        name.contains("router")
            || step
                .router_params
                .iter()
                .any(|p| name == format!("new.{p}"))
    };
    let mut same = 0;
    for (name, va) in &a {
        let vb = &b[name];
        let (xa, xb) = (va.as_f32().unwrap(), vb.as_f32().unwrap());
        let identical = xa
            .iter()
            .zip(xb.iter())
            .all(|(p, q)| p.to_bits() == q.to_bits());
        if routerish(name) {
            if name.starts_with("new.l") || name.starts_with("router_loss") {
                assert!(!identical, "{name} ignores the router loss's weights");
            }
        } else {
            assert!(identical, "{name} changed with the router loss's weights");
            same += 1;
        }
    }
    // The main parameters, their moments, the surprise and the loss are
    // among the outputs compared.
    assert!(a.contains_key("surprise.l1") && a.contains_key("new.l0.moe.w1"));
    assert!(same > 2 * step.params.len(), "{same} outputs compared");
    // The hyper step moves every parameter.
    for (name, t) in &s.inputs {
        if let Some(new) = a.get(&format!("new.{name}")) {
            let old = HostTensor::from_graph(t);
            assert_ne!(
                new.as_f32().unwrap(),
                old.as_f32().unwrap(),
                "{name} did not move"
            );
        }
    }
    // ONNX Runtime (f32) against the reference interpreter (f64), on every
    // output but the new parameters: Adam's first step is lr * sign(g),
    // which turns a gradient that is 0 up to rounding (the attention keys'
    // bias) into +-lr either way. The gradients are compared through the
    // new first moments, (1 - beta1) g.
    let feeds: HashMap<String, Value> = a_in
        .iter()
        .map(|(n, t)| (n.clone(), Value::from_tensor(t)))
        .collect();
    let want: HashMap<String, Value> = eval_graph(&step.graph, &feeds)
        .unwrap()
        .into_iter()
        .collect();
    let mut compared = 0;
    for (name, got) in &a {
        let param = name.starts_with("new.") && !name.ends_with(".m") && !name.ends_with(".v");
        if param && !name.ends_with(".t") {
            continue;
        }
        compared += 1;
        let w = want[name].f();
        let g = got.as_f32().unwrap();
        let err = w
            .iter()
            .zip(g.iter())
            .map(|(x, y)| (x - f64::from(*y)).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
        assert!(err <= 1e-4 * scale, "{name}: error {err}, scale {scale}");
    }
    assert!(
        compared > 2 * step.params.len(),
        "{compared} outputs compared"
    );
}
