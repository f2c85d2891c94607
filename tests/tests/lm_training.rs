//! The language model learns a small fact world through its compiled
//! training step: `metatest::build_train_step` of the LM problem (forward,
//! gradient and Adam as one ONNX graph), run by ONNX Runtime with the
//! parameters and Adam's moments carried between steps by the host.

use std::collections::HashMap;

use metac_compiler::metatest::{build_train_step, run_init, to_onnx, MetaOptimizer};
use metac_compiler::models::baselines::{Adam, Baseline};
use metac_compiler::models::lm::{LmProblem, LmTarget};
use metac_compiler::models::problems::Problem;
use metac_compiler::models::transformer::{Gpt, GptConfig};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::data::facts::{FactWorld, Prompt, WorldConfig};
use metac_runtime::tensor::HostTensor;
use ndarray::{ArrayD, IxDyn};

/// A batch of prompts as `tokens`, `targets` and `weights` `[B, T]`: the
/// prompt's tokens, the next token at each position, weight 1 only where the
/// answer is predicted.
fn batch(prompts: &[&Prompt], t: usize) -> [HostTensor; 3] {
    let b = prompts.len();
    let (mut tok, mut tgt, mut w) = (vec![0i64; b * t], vec![0i64; b * t], vec![0f32; b * t]);
    for (i, p) in prompts.iter().enumerate() {
        let n = p.tokens.len();
        for j in 0..n {
            tok[i * t + j] = i64::from(p.tokens[j]);
            tgt[i * t + j] = if j + 1 < n {
                i64::from(p.tokens[j + 1])
            } else {
                i64::from(p.answer)
            };
        }
        w[i * t + n - 1] = 1.0;
    }
    let i64s = |v: Vec<i64>| HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b, t]), v).unwrap());
    [
        i64s(tok),
        i64s(tgt),
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, t]), w).unwrap()),
    ]
}

#[test]
fn the_compiled_training_step_learns_a_small_fact_world() {
    let world = FactWorld::generate(&WorldConfig {
        seed: 3,
        subjects: 24,
        relations: 2,
        objects: (3, 4),
        ..WorldConfig::default()
    })
    .unwrap();
    let prompts = world.training_prompts();
    let t = prompts.iter().map(|p| p.tokens.len()).max().unwrap();
    let gpt = Gpt::new(GptConfig {
        vocab: world.vocab.len(),
        context: 16,
        width: 32,
        layers: 2,
        heads: 2,
        mlp_ratio: 4,
        tied_head: false,
        moe: None,
        swiglu: None,
    })
    .unwrap();
    let b = 16;
    let problem = LmProblem::new("facts", gpt, b, t, LmTarget::Sequence);
    let adam = MetaOptimizer::Baseline(Baseline::Adam(Adam {
        lr: 3e-3,
        ..Adam::default()
    }));
    let ts = build_train_step(&problem, &adam);
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        ..Default::default()
    })
    .expect("ONNX Runtime (pip install -r requirements.txt)");
    let mut s = backend
        .load(&to_onnx(&ts.graph, "lm_train_step").unwrap(), "lm")
        .unwrap();
    let init = run_init("adam", &problem, &adam, &[], 0);
    let mut params: Vec<HostTensor> = init.params.iter().map(HostTensor::from_graph).collect();
    let mut state: Vec<HostTensor> = init.state.iter().map(HostTensor::from_graph).collect();
    let n = prompts.len();
    let steps = 300;
    let mut losses = vec![];
    for step in 0..steps {
        let picked: Vec<&Prompt> = (0..b).map(|i| &prompts[(step * b + i * 7) % n]).collect();
        let data = batch(&picked, t);
        let mut ins: Vec<(&str, &HostTensor)> = vec![];
        ins.extend(ts.io.params.iter().map(String::as_str).zip(&params));
        ins.extend(ts.io.state.iter().map(String::as_str).zip(&state));
        ins.extend(ts.io.batch.iter().map(String::as_str).zip(&data));
        let mut out: HashMap<String, HostTensor> = s.run(&ins).unwrap().into_iter().collect();
        losses.push(out[&ts.io.loss].to_scalar_f32().unwrap());
        params = ts
            .io
            .new_params
            .iter()
            .map(|k| out.remove(k).unwrap())
            .collect();
        state = ts
            .io
            .new_state
            .iter()
            .map(|k| out.remove(k).unwrap())
            .collect();
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (losses[0], mean(&losses[steps - 10..]));
    // At the start (GPT-2's small initial weights) the answer is a guess
    // among the whole vocabulary.
    let ln_v = (world.vocab.len() as f32).ln();
    assert!(
        (first - ln_v).abs() < 0.15,
        "first loss {first}, ln V {ln_v}"
    );
    assert!(
        last < 0.2 * first,
        "the loss went from {first} to {last}: {:?}",
        &losses[steps - 10..]
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    // The final parameters are shaped as the problem says.
    for (p, (_, shape)) in params.iter().zip(problem.param_shapes()) {
        assert_eq!(p.shape(), shape.as_slice());
    }
}
