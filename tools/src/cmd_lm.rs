//! `metac compile lm` and `metac run` of a language-model bundle: the GPT
//! on a fact world, trained by its compiled step until it knows its facts.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_compiler::lm::compile_lm;
use metac_compiler::models::transformer::Gpt;
use metac_contract::bundle::Bundle;
use metac_contract::fsutil::write_atomic;
use metac_contract::lm::{lm_run_settings, LmConfig, LmData, LmRunSettings};
use metac_runtime::backend::open_backend;
use metac_runtime::data::facts::FactWorld;
use metac_runtime::lm::run::{LmReport, LmWorkload};
use metac_runtime::trainer::{Trainer, TrainerOptions, BEST_WEIGHTS};
use serde::Serialize;

use crate::cmd_l2o::RunArgs;

/// `metac compile lm --config FILE --out DIR`.
pub fn compile(config: &Path, out: &Path) -> Result<()> {
    let c = LmConfig::load(config)?;
    let t0 = Instant::now();
    let world = FactWorld::generate(&c.world).context("config table [world]")?;
    let seq = world.longest_prompt();
    let vocab = world.vocab.len();
    let m = compile_lm(&c, LmData::Facts(c.world.clone()), vocab, seq, out)?;
    let params = Gpt::new(c.model.with_vocab(vocab))
        .map_err(anyhow::Error::msg)?
        .num_params();
    println!(
        "wrote lm bundle {} ({} graphs; a model of {params} parameters over {vocab} words, prompts of up to {seq} tokens, batches of {}) in {:.1}s",
        out.display(),
        m.graphs.len(),
        c.train.batch,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What `metac run` of an LM bundle writes to `RUN/summary.json`.
#[derive(Serialize)]
struct Summary<'a> {
    /// The weights the report is of (`best.safetensors`, or the final
    /// parameters without validation).
    weights: &'a str,
    epochs: usize,
    seconds: f64,
    #[serde(flatten)]
    report: LmReport,
}

/// `metac run` of an LM bundle.
pub fn run(a: RunArgs, bundle: Bundle) -> Result<()> {
    a.reject_l2o_flags(
        &bundle,
        "a language-model",
        "--epochs, --seed, --evaluation-period",
    )?;
    ensure!(
        a.trajectories.is_none(),
        "--trajectories applies to editor bundles; {} is a language-model bundle",
        bundle.dir.display()
    );
    let mut s = match &a.config {
        Some(p) => lm_run_settings(p)?,
        None => LmRunSettings::default(),
    };
    if let Some(v) = a.epochs {
        s.epochs = v;
    }
    if let Some(v) = a.seed {
        s.seed = v;
    }
    if let Some(v) = a.evaluation_period {
        s.evaluation_period = v;
    }
    s.validate()?;
    let backend = open_backend(&a.backend.options())?;
    let t0 = Instant::now();
    let mut w = LmWorkload::new(&bundle, backend.as_ref(), s.clone())?;
    let identity = w.manifest_sha256.clone();
    let mut trainer = Trainer::open(&mut w, &a.out, &identity, a.resume)?;
    if !a.quiet {
        eprintln!(
            "metac run: language model ({} layers, width {}, {} words) on {} ({}), {} epochs of batches of {}, seed {}, starting at epoch {}",
            w.meta.model.layers,
            w.meta.model.width,
            w.meta.model.vocab,
            backend.name(),
            a.backend.device,
            s.epochs,
            w.meta.batch,
            s.seed,
            trainer.completed()
        );
    }
    let opts = TrainerOptions {
        iterations: s.epochs,
        evaluation_period: s.evaluation_period,
        quiet: a.quiet,
    };
    trainer.run(&mut w, opts, &mut |_| {})?;
    // The report is of the best weights where validation picked them.
    let weights = if trainer.restore_best(&mut w)? {
        BEST_WEIGHTS
    } else {
        "final parameters"
    };
    let report = w.report()?;
    let summary = Summary {
        weights,
        epochs: trainer.completed(),
        seconds: t0.elapsed().as_secs_f64(),
        report,
    };
    write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let r = &summary.report;
    println!(
        "trained {} epochs; {weights}: train-template accuracy {:.4} ({} prompts), held-out paraphrase accuracy {:.4} ({} prompts); {}",
        trainer.completed(),
        r.train_template_accuracy,
        r.train_template_prompts,
        r.heldout_paraphrase_accuracy,
        r.heldout_paraphrase_prompts,
        a.out.join("summary.json").display()
    );
    Ok(())
}
