//! `metac compile moe`, `metac run` of a MoE bundle and `metac sample`:
//! the mixture-of-experts LM of the Tiny-ONN workload, trained on text by
//! its compiled hyper step (or the single-backward step of the baselines).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_compiler::models::transformer::Gpt;
use metac_compiler::moe::compile_moe;
use metac_contract::bundle::{read_safetensors, Bundle};
use metac_contract::fsutil::write_atomic;
use metac_contract::moe::{MoeLmConfig, MoeMeta, MoeRunSettings, RouterTable};
use metac_runtime::backend::open_backend;
use metac_runtime::data::text::load_corpus;
use metac_runtime::moe::{sample as sample_text, HeldOut, MoeWorkload, SampleOptions};
use metac_runtime::tensor::HostTensor;
use metac_runtime::trainer::{
    RunRecord, Trainer, TrainerOptions, BEST_WEIGHTS, CHECKPOINT_WEIGHTS,
};
use serde::Serialize;

use crate::cmd_l2o::RunArgs;
use crate::common::BackendArgs;

/// Parameters of `gpt` that one token uses: all but the experts it does not
/// take, for `k` experts per token.
fn active_params(gpt: &Gpt, k: f64) -> f64 {
    let total = gpt.num_params() as f64;
    match &gpt.config.moe {
        Some(m) => {
            let per_expert = (3 * gpt.config.width * m.hidden) as f64;
            total - gpt.config.layers as f64 * (m.experts as f64 - k) * per_expert
        }
        None => total,
    }
}

/// `metac compile moe --config FILE --out DIR`.
pub fn compile(config: &Path, out: &Path) -> Result<()> {
    let c = MoeLmConfig::load(config)?;
    let t0 = Instant::now();
    let m = compile_moe(&c, out)?;
    let gpt = Gpt::new(c.gpt()).map_err(anyhow::Error::msg)?;
    let what = match &c.model.moe {
        Some(moe) => format!(
            "{} experts of hidden {} per block, budget {}, {}..={} experts per token",
            moe.experts,
            moe.hidden,
            moe.budget,
            moe.min_k,
            moe.max_k()
        ),
        None => match c.model.swiglu {
            Some(h) => format!("dense SwiGLU MLPs of hidden {h}"),
            None => "GELU MLPs".into(),
        },
    };
    println!(
        "wrote moe bundle {} ({} graphs, {:?} step; {} parameters, {what}; windows of {} bytes, batches of {}) in {:.1}s",
        out.display(),
        m.graphs.len(),
        c.train.mode,
        gpt.num_params(),
        c.model.context,
        c.train.batch,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What `metac run` of a MoE bundle writes to `RUN/summary.json`.
#[derive(Serialize)]
struct Summary<'a> {
    /// The weights the report is of.
    weights: &'a str,
    steps: usize,
    /// Training bytes seen (steps x batch x context).
    tokens: usize,
    seconds: f64,
    corpus: String,
    train_bytes: usize,
    heldout_bytes: usize,
    documents: usize,
    /// Parameters, and those a token uses at the held-out mean k.
    params: usize,
    active_params: f64,
    heldout: HeldOut,
}

/// The `[run]` and `[router]` tables: from `--config`, else the defaults
/// and the router table the bundle was compiled with.
fn settings(
    a: &RunArgs,
    meta: &MoeMeta,
    bundle_dir: &Path,
) -> Result<(MoeRunSettings, RouterTable)> {
    let (mut s, r) = match &a.config {
        Some(p) => {
            let c = MoeLmConfig::load(p)?;
            let (want, have) = (c.gpt(), &meta.model);
            ensure!(
                want.context == have.context,
                "{}: config key 'model.context' ({}) differs from the bundle's compiled context ({}); compile the config with `metac compile moe`",
                p.display(),
                want.context,
                have.context
            );
            ensure!(
                &want == have,
                "{}: config table [model] differs from the model the bundle {} was compiled with; compile the config with `metac compile moe`",
                p.display(),
                bundle_dir.display()
            );
            (c.run, c.router)
        }
        None => {
            let r: RouterTable = match meta.config.get("router") {
                Some(v) => {
                    serde_json::from_value(v.clone()).context("the bundle's router table")?
                }
                None => RouterTable::default(),
            };
            (MoeRunSettings::default(), r)
        }
    };
    if let Some(v) = a.steps {
        s.steps = v;
    }
    if let Some(v) = a.seed {
        s.seed = v;
    }
    if let Some(v) = a.evaluation_period {
        s.evaluation_period = v;
    }
    s.validate()?;
    Ok((s, r))
}

/// `metac run` of a MoE bundle.
pub fn run(a: RunArgs, bundle: Bundle) -> Result<()> {
    a.reject_l2o_flags(
        &bundle,
        "a mixture-of-experts",
        "--config, --data, --steps, --seed, --evaluation-period",
    )?;
    for (flag, given) in [
        ("--epochs", a.epochs.is_some()),
        ("--trajectories", a.trajectories.is_some()),
    ] {
        ensure!(
            !given,
            "{flag} does not apply to mixture-of-experts bundles ({}); use --steps",
            bundle.dir.display()
        );
    }
    let meta = MoeMeta::from_manifest(&bundle.manifest)
        .with_context(|| format!("{}", bundle.dir.display()))?;
    let (s, router) = settings(&a, &meta, &bundle.dir)?;
    let corpus = load_corpus(a.data.as_deref(), s.heldout_every)?;
    let backend = open_backend(&a.backend.options())?;
    let t0 = Instant::now();
    let mut w = MoeWorkload::new(&bundle, backend.as_ref(), corpus, s.clone(), router)?;
    let identity = w.manifest_sha256.clone();
    let mut trainer = Trainer::open(&mut w, &a.out, &identity, a.resume)?;
    RunRecord::write(&a.out, &bundle)?;
    if !a.quiet {
        let c = &w.corpus;
        eprintln!(
            "metac run: {:?}-step byte LM ({} layers, width {}) on {} ({}); corpus {} ({} files, {} documents: {} training bytes, {} held out); {} steps of {} windows of {} bytes, seed {}, from iteration {}",
            meta.mode,
            meta.model.layers,
            meta.model.width,
            backend.name(),
            a.backend.device,
            c.source.display(),
            c.files.len(),
            c.documents,
            c.train.len(),
            c.heldout.len(),
            s.steps,
            meta.batch,
            meta.model.context,
            s.seed,
            trainer.completed()
        );
    }
    let opts = TrainerOptions {
        iterations: w.total_iterations(),
        evaluation_period: s.evaluation_period,
        quiet: a.quiet,
    };
    trainer.run(&mut w, opts, &mut |_| {})?;
    let weights = if trainer.restore_best(&mut w)? {
        BEST_WEIGHTS
    } else {
        "final parameters"
    };
    let heldout = w.heldout(true)?;
    let gpt = Gpt::new(meta.model.clone()).map_err(anyhow::Error::msg)?;
    let k = if heldout.mean_k.is_empty() {
        0.0
    } else {
        heldout.mean_k.iter().sum::<f64>() / heldout.mean_k.len() as f64
    };
    let steps = (trainer.completed() * s.steps_per_iteration).min(s.steps);
    let summary = Summary {
        weights,
        steps,
        tokens: steps * meta.batch * meta.model.context,
        seconds: t0.elapsed().as_secs_f64(),
        corpus: w.corpus.source.display().to_string(),
        train_bytes: w.corpus.train.len(),
        heldout_bytes: w.corpus.heldout.len(),
        documents: w.corpus.documents,
        params: gpt.num_params(),
        active_params: active_params(&gpt, k),
        heldout,
    };
    write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let h = &summary.heldout;
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "trained {steps} steps; {weights}: held-out {:.4} bits/byte ({} windows); per block: mean active experts [{}], gating accuracy [{}]; {}",
        h.bits_per_byte,
        h.windows,
        fmt(&h.mean_k),
        fmt(&h.gating_accuracy),
        a.out.join("summary.json").display()
    );
    Ok(())
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metac sample runs/moe --prompt \"The \"\n  metac sample runs/moe --prompt \"Q: \" --bytes 400 --temperature 0.8 --seed 3"
)]
pub struct SampleArgs {
    /// A run of `metac run` of a MoE bundle.
    pub run: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    pub bytes: usize,
    /// 0: greedy, the most likely byte each time; otherwise sampling from
    /// softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The run's best weights (by held-out bits per byte) or its last
    /// checkpoint's.
    #[arg(long, default_value = "best", value_parser = ["best", "final"])]
    pub weights: String,
    /// The bundle (default: the one the run recorded in run.json).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// `metac sample RUN --prompt TEXT`.
pub fn sample(a: SampleArgs) -> Result<()> {
    let bundle = RunRecord::bundle_of(&a.run, a.bundle.as_deref())?;
    let meta = MoeMeta::from_manifest(&bundle.manifest)
        .with_context(|| format!("{}", bundle.dir.display()))?;
    let file = if a.weights == "final" {
        CHECKPOINT_WEIGHTS
    } else {
        BEST_WEIGHTS
    };
    let p = a.run.join(file);
    ensure!(
        p.is_file(),
        "{}: not found (the run has not {} yet)",
        p.display(),
        if a.weights == "final" {
            "completed an iteration"
        } else {
            "validated; --weights final takes its last checkpoint"
        }
    );
    let what = p.display().to_string();
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {what}"))?;
    let tensors = read_safetensors(&bytes, &what)?;
    let params = meta
        .params
        .iter()
        .map(|n| {
            let t = tensors
                .get(n)
                .with_context(|| format!("{what}: no tensor '{n}'"))?;
            Ok((n.clone(), HostTensor::from_graph(t)))
        })
        .collect::<Result<Vec<_>>>()?;
    let backend = open_backend(&a.backend.options())?;
    let text = sample_text(
        &bundle,
        backend.as_ref(),
        &params,
        &a.prompt,
        SampleOptions {
            bytes: a.bytes,
            temperature: a.temperature,
            seed: a.seed,
        },
    )?;
    println!("{}{text}", a.prompt);
    Ok(())
}
