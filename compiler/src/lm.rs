//! The language-model program (`metac compile lm`): the GPT of
//! [`crate::models::transformer`] on prompts with one answer token, compiled
//! into a bundle of two graphs, `train_step` (forward, gradient and Adam as
//! one graph, with the learning rate's multiplier an input) and `evaluate` (per-prompt answer likelihood and rank); see
//! `metac_contract::lm` for the names and `docs/bundle.md` for the record.
//!
//! The vocabulary and the sequence length come from the data, which the
//! caller generates (the compiler knows no data sets).

use std::path::Path;

use anyhow::{Context, Result};
use metac_contract::bundle::{BundleBuilder, Manifest, Port, StateBuffer};
use metac_contract::lm::{LmConfig, LmData, LmMeta, LM_EVALUATE, LM_KIND, LM_TRAIN_STEP};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph};

use crate::metatest::{build_train_step, MetaOptimizer};
use crate::models::baselines::{constant_rules, Adam, Baseline, StepOptimizer, LR_SCALE};
use crate::models::lm::{LmProblem, LmTarget};
use crate::models::problems::Problem;
use crate::models::transformer::Gpt;

/// The `evaluate` graph of `gpt` on batches of `e` prompts of `seq` tokens.
pub fn build_lm_evaluate(gpt: &Gpt, e: usize, seq: usize) -> Graph {
    let mut g = Graph::new();
    let params = gpt.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[e, seq]);
    let positions = g.input("positions", DType::I64, &[e]);
    let answers = g.input("answers", DType::I64, &[e]);
    let (nll, correct) = gpt.answer_scores(&mut g, &params, tokens, positions, answers);
    g.output("nll", nll);
    g.output("correct", correct);
    g
}

/// Compile `config` for data `data` with a vocabulary of `vocab` tokens and
/// prompts of at most `seq` tokens into a bundle in `out`.
pub fn compile_lm(
    config: &LmConfig,
    data: LmData,
    vocab: usize,
    seq: usize,
    out: &Path,
) -> Result<Manifest> {
    config.validate()?;
    let model = config.model.with_vocab(vocab);
    let gpt = Gpt::new(model.clone()).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        seq <= model.context,
        "prompts of {seq} tokens exceed the model's context ({})",
        model.context
    );
    let t = &config.train;
    let problem = LmProblem::new("lm", gpt.clone(), t.batch, seq, LmTarget::Answer);
    let adam = Adam {
        lr: t.lr as f32,
        beta1: t.beta1 as f32,
        beta2: t.beta2 as f32,
        eps: t.eps as f32,
        scaled_lr: true,
    };
    let opt = MetaOptimizer::Baseline(Baseline::Adam(adam));
    let ts = build_train_step(&problem, &opt);
    let evaluate = build_lm_evaluate(&gpt, t.eval_batch, seq);

    let mut b = BundleBuilder::new(LM_KIND);
    b.graph(LM_TRAIN_STEP, &optimize(&ts.graph))
        .context("exporting train_step")?;
    b.graph(LM_EVALUATE, &optimize(&evaluate))
        .context("exporting evaluate")?;
    let port = |graph: &str, tensor: &str| Port {
        graph: graph.into(),
        tensor: tensor.into(),
    };
    let shapes: Vec<Vec<usize>> = problem.param_shapes().into_iter().map(|(_, s)| s).collect();
    let state_init = constant_rules(adam.initial_state(&shapes))?;
    let init = problem
        .init_rules()
        .context("the language model has init rules")?;
    // Parameters are read by both graphs; the optimizer state by the step.
    for r in &init {
        b.state(StateBuffer {
            name: r.name.clone(),
            dtype: "f32".into(),
            shape: r.shape.clone(),
            init: None,
            reads: vec![port(LM_TRAIN_STEP, &r.name), port(LM_EVALUATE, &r.name)],
            updated_by: Some(port(LM_TRAIN_STEP, &format!("new.{}", r.name))),
        });
    }
    for r in &state_init {
        b.state(StateBuffer {
            name: r.name.clone(),
            dtype: "f32".into(),
            shape: r.shape.clone(),
            init: None,
            reads: vec![port(LM_TRAIN_STEP, &r.name)],
            updated_by: Some(port(LM_TRAIN_STEP, &format!("new.{}", r.name))),
        });
    }
    let mut shown = serde_json::to_value(config)?;
    if let Some(o) = shown.as_object_mut() {
        o.remove("run");
    }
    let meta = LmMeta {
        config: shown,
        model,
        data,
        seq,
        batch: t.batch,
        eval_batch: t.eval_batch,
        train_step: ts.io,
        lr_scale: LR_SCALE.into(),
        init,
        state_init,
    };
    b.meta(meta.to_meta());
    b.write(out)
}
