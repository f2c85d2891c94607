//! `metac eval`: meta-test the frozen learned optimizer of a run against
//! hand-designed baselines on an MNIST problem.
//!
//! Per seed every optimizer starts from the same initial parameters
//! (`problem.init_params(seed)`) and sees the same minibatches
//! (`Batches::generate(split size, batch, steps, seed)`); the final
//! parameters are evaluated on the whole split. Writes `curves.csv`,
//! `summary.json` and `curves.png` into `--out`, and prints a table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use metac_compiler::metatest::{
    build_evaluate, build_train_step, run_init, to_onnx, MetaOptimizer,
};
use metac_compiler::models::baselines::{Adagrad, Adam, Baseline, RmsProp, Sgd};
use metac_compiler::models::hrnn::{Hrnn, HrnnConfig};
use metac_compiler::models::problems::{problem_by_name, DataKind, Problem};
use metac_runtime::backend::{open_backend, Session};
use metac_runtime::bundle::Bundle;
use metac_runtime::data::mnist::{self, Split};
use metac_runtime::l2o::run::load_run_phi;
use metac_runtime::metatest::{
    run_optimizer, Batches, EvalIo, MetaTestResults, OptimizerSummary, Stat,
};
use metac_runtime::plot::{plot_curves_with, PlotOptions};

use crate::common::BackendArgs;

/// The optimizers run when `--optimizers` is not given.
pub const DEFAULT_OPTIMIZERS: &str =
    "learned,adam-1e-3,adam-1e-4,sgd-1e-3,rmsprop-1e-3,adagrad-1e-2";

/// Which meta-parameters of the run to use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhiChoice {
    /// best.safetensors (best validation objective), else the last checkpoint.
    Best,
    /// checkpoint.safetensors (the last meta-iteration).
    Last,
}

/// The MNIST split the batches are drawn from and the final parameters are
/// evaluated on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitChoice {
    Test,
    Validation,
    Train,
}

impl SplitChoice {
    fn name(self) -> &'static str {
        match self {
            SplitChoice::Test => "test",
            SplitChoice::Validation => "validation",
            SplitChoice::Train => "train",
        }
    }
}

/// Meta-test the learned optimizer of a run against baselines.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
metac eval runs/seed --bundle bundles/seed --problem mnist-mlp-relu --steps 10000 --seeds 6,12,18,24,30 --out eval/relu\n  \
metac eval --problem mnist-mlp --optimizers adam-1e-3,sgd-1e-1 --steps 2000 --out eval/baselines\n\n\
Optimizers: `learned` (the run's meta-parameters; needs RUN and --bundle) and NAME-LR with NAME one of \
adam, sgd, rmsprop, adagrad (e.g. adam-1e-3). Per seed, every optimizer starts from the same initial \
parameters and sees the same minibatches. Writes OUT/curves.csv (optimizer,seed,step,loss), \
OUT/summary.json (per optimizer: mean and std over seeds of the final loss, the loss at 1,000 steps \
and the accuracy on the split) and OUT/curves.png (mean curves over seeds, log scale).")]
pub struct Args {
    /// Run directory of `metac run` (needed for the `learned` optimizer).
    pub run: Option<PathBuf>,
    /// The bundle the run meta-trained (gives the learned optimizer's config).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Problem to optimize (default: the bundle's problem, else mnist-mlp).
    #[arg(long)]
    pub problem: Option<String>,
    /// Steps per run.
    #[arg(long, default_value_t = 10_000)]
    pub steps: usize,
    /// Comma-separated seeds (of the initial parameters and the batches).
    #[arg(long, default_value = "6,12,18,24,30")]
    pub seeds: String,
    /// Comma-separated optimizers: learned, adam-LR, sgd-LR, rmsprop-LR, adagrad-LR.
    #[arg(long, default_value = DEFAULT_OPTIMIZERS)]
    pub optimizers: String,
    /// Which meta-parameters of RUN the learned optimizer uses.
    #[arg(long, value_enum, default_value_t = PhiChoice::Best)]
    pub phi: PhiChoice,
    /// Minibatch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Evaluation chunk size (clamped to the split size).
    #[arg(long, default_value_t = 1000)]
    pub eval_batch_size: usize,
    /// MNIST split for the batches and the final evaluation.
    #[arg(long, value_enum, default_value_t = SplitChoice::Test)]
    pub split: SplitChoice,
    /// MNIST directory (IDX files, gzip or raw); default: the shipped data/mnist.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// One requested optimizer: its label and what to build.
#[derive(Clone, Debug, PartialEq)]
pub enum OptSpec {
    Learned,
    Baseline(String, Baseline),
}

impl OptSpec {
    pub fn label(&self) -> &str {
        match self {
            OptSpec::Learned => "learned",
            OptSpec::Baseline(l, _) => l,
        }
    }
}

/// Parses `learned` or `NAME-LR` (e.g. `adam-1e-3`).
pub fn parse_optimizer(s: &str) -> Result<OptSpec> {
    let s = s.trim();
    if s == "learned" {
        return Ok(OptSpec::Learned);
    }
    let bad = || {
        anyhow::anyhow!(
            "unknown optimizer '{s}' (expected learned or NAME-LR with NAME one of adam, sgd, rmsprop, adagrad, e.g. adam-1e-3)"
        )
    };
    let (name, lr) = s.split_once('-').ok_or_else(bad)?;
    let lr: f32 = lr.parse().map_err(|_| bad())?;
    if !(lr.is_finite() && lr > 0.0) {
        bail!("optimizer '{s}': the learning rate must be a finite number > 0");
    }
    let b = match name {
        "adam" => Baseline::Adam(Adam::with_lr(lr)),
        "sgd" => Baseline::Sgd(Sgd {
            lr,
            ..Sgd::default()
        }),
        "rmsprop" => Baseline::RmsProp(RmsProp {
            lr,
            ..RmsProp::default()
        }),
        "adagrad" => Baseline::Adagrad(Adagrad {
            lr,
            ..Adagrad::default()
        }),
        _ => return Err(bad()),
    };
    Ok(OptSpec::Baseline(s.to_string(), b))
}

/// Parses a comma-separated optimizer list (no duplicates, not empty).
pub fn parse_optimizers(s: &str) -> Result<Vec<OptSpec>> {
    let mut out: Vec<OptSpec> = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let o = parse_optimizer(part)?;
        ensure!(
            !out.iter().any(|p| p.label() == o.label()),
            "optimizer '{part}' is listed twice"
        );
        out.push(o);
    }
    ensure!(!out.is_empty(), "--optimizers lists no optimizer");
    Ok(out)
}

/// Parses a comma-separated seed list (no duplicates, not empty).
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = vec![];
    for part in s.split(',').map(str::trim) {
        let v: u64 = part.parse().map_err(|_| {
            anyhow::anyhow!("malformed seed '{part}' in --seeds '{s}' (expected e.g. 6,12,18)")
        })?;
        ensure!(!out.contains(&v), "seed {v} is listed twice in --seeds");
        out.push(v);
    }
    Ok(out)
}

/// The learned optimizer: its config from the bundle and its weights from
/// the run, in the graph's `phi` order.
fn load_learned(
    run: Option<&Path>,
    bundle: Option<&Bundle>,
    phi: PhiChoice,
) -> Result<(Hrnn, Vec<(String, metac_graphs::Tensor)>)> {
    let run = run.context("the optimizer 'learned' needs a run directory (metac eval RUN --bundle BUNDLE ...); leave it out of --optimizers to run baselines only")?;
    let bundle = bundle.context(
        "the optimizer 'learned' needs --bundle BUNDLE (the bundle the run meta-trained)",
    )?;
    let cfg: HrnnConfig = crate::cmd_l2o::bundle_config(bundle)?
        .optimizer
        .hrnn_config();
    let hrnn = Hrnn::new(cfg);
    let mut loaded = load_run_phi(run, phi == PhiChoice::Best)?;
    let specs = hrnn.weights().shapes();
    let mut ordered = Vec::with_capacity(specs.len());
    for (name, shape) in &specs {
        let i = loaded
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| {
                format!(
                    "{}: the run's meta-parameters have no '{name}' (does the run belong to bundle {}?)",
                    run.display(),
                    bundle.dir.display()
                )
            })?;
        let (n, t) = loaded.swap_remove(i);
        ensure!(
            &t.shape == shape,
            "{}: meta-parameter '{n}' has shape {:?}, the bundle's optimizer expects {shape:?}",
            run.display(),
            t.shape
        );
        ordered.push((n, t));
    }
    if let Some((n, _)) = loaded.first() {
        bail!(
            "{}: meta-parameter '{n}' is unknown to the bundle's optimizer (does the run belong to bundle {}?)",
            run.display(),
            bundle.dir.display()
        );
    }
    Ok((hrnn, ordered))
}

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.4} ± {:.4}", s.mean, s.std),
        None => "n/a".into(),
    }
}

fn fmt_acc(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.2}% ± {:.2}", 100.0 * s.mean, 100.0 * s.std),
        None => "n/a".into(),
    }
}

/// The table printed at the end.
pub fn table(summary: &[OptimizerSummary], split: &str) -> String {
    let acc_head = format!("{split} accuracy");
    let rows: Vec<[String; 5]> = summary
        .iter()
        .map(|o| {
            [
                o.optimizer.clone(),
                fmt_stat(&o.final_loss),
                fmt_stat(&o.loss_at_1000),
                fmt_acc(&o.eval_accuracy),
                format!("{}/{}", o.diverged, o.seeds.len()),
            ]
        })
        .collect();
    let head = [
        "optimizer".to_string(),
        "final loss".into(),
        "loss@1000".into(),
        acc_head,
        "diverged".into(),
    ];
    let mut w = [0usize; 5];
    for r in rows.iter().chain(std::iter::once(&head)) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String; 5]| -> String {
        let mut s = String::new();
        for (i, c) in r.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(&head);
    for r in &rows {
        s.push_str(&line(r));
    }
    s
}

fn split_of(m: &mnist::Mnist, c: SplitChoice) -> &Split {
    match c {
        SplitChoice::Test => &m.test,
        SplitChoice::Validation => &m.validation,
        SplitChoice::Train => &m.train,
    }
}

pub fn run(a: Args) -> Result<()> {
    // Validate every input before loading anything.
    let specs = parse_optimizers(&a.optimizers)?;
    let seeds = parse_seeds(&a.seeds)?;
    ensure!(a.steps > 0, "--steps must be at least 1");
    ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    ensure!(
        a.eval_batch_size > 0,
        "--eval-batch-size must be at least 1"
    );
    let bundle = a.bundle.as_deref().map(Bundle::load).transpose()?;
    let problem_name = match (&a.problem, &bundle) {
        (Some(p), _) => p.clone(),
        (None, Some(b)) => crate::cmd_l2o::bundle_config(b)?.problem,
        (None, None) => "mnist-mlp".into(),
    };
    let problem: Box<dyn Problem> =
        problem_by_name(&problem_name, a.batch_size).map_err(anyhow::Error::msg)?;
    match problem.needs_data() {
        Some(DataKind::Mnist) => {}
        None => {
            bail!("problem '{problem_name}' needs no data; eval supports MNIST problems for now")
        }
    }
    let learned = if specs.contains(&OptSpec::Learned) {
        Some(load_learned(a.run.as_deref(), bundle.as_ref(), a.phi)?)
    } else {
        None
    };

    let dir = a.data_dir.clone().unwrap_or_else(mnist::default_dir);
    let data = mnist::load(&dir)?;
    let split = split_of(&data, a.split);
    let eval_batch = a.eval_batch_size.min(split.len());
    let eval_problem = problem_by_name(&problem_name, eval_batch).map_err(anyhow::Error::msg)?;
    let eval_graph = build_evaluate(eval_problem.as_ref()).map_err(anyhow::Error::msg)?;
    let backend = open_backend(&a.backend.options())?;
    let mut eval_sess = backend.load(
        &to_onnx(&eval_graph.graph, "evaluate").map_err(anyhow::Error::msg)?,
        "evaluate",
    )?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    eprintln!(
        "metac eval: {problem_name} on MNIST {} ({} examples), {} optimizers x {} seeds x {} steps, batch {}, {} ({})",
        a.split.name(),
        split.len(),
        specs.len(),
        seeds.len(),
        a.steps,
        a.batch_size,
        backend.name(),
        a.backend.device
    );

    // The batches per seed, shared by every optimizer.
    let batches: Vec<Batches> = seeds
        .iter()
        .map(|&s| Batches::generate(split.len(), a.batch_size, a.steps, s))
        .collect::<Result<_>>()?;
    let mut results = MetaTestResults {
        problem: problem_name.clone(),
        split: a.split.name().into(),
        batch_size: a.batch_size,
        steps: a.steps,
        runs: vec![],
    };
    let no_phi: Vec<(String, metac_graphs::Tensor)> = vec![];
    for spec in &specs {
        let (opt, phi) = match spec {
            OptSpec::Learned => {
                let (h, phi) = learned.as_ref().expect("loaded above");
                (MetaOptimizer::Hrnn(h.clone()), phi)
            }
            OptSpec::Baseline(_, b) => (MetaOptimizer::Baseline(*b), &no_phi),
        };
        let label = spec.label();
        let t0 = Instant::now();
        let ts = build_train_step(problem.as_ref(), &opt);
        let onnx = to_onnx(&ts.graph, "train_step").map_err(anyhow::Error::msg)?;
        let mut train = backend
            .load(&onnx, &format!("train_step ({label})"))
            .with_context(|| format!("loading train_step for {label}"))?;
        eprintln!(
            "[{label}] built train_step in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        for (&seed, b) in seeds.iter().zip(&batches) {
            let t0 = Instant::now();
            let init = run_init(label, problem.as_ref(), &opt, phi, seed);
            let eval: Option<(&mut dyn Session, &EvalIo, &Split)> =
                Some((eval_sess.as_mut(), &eval_graph.io, split));
            let r = run_optimizer(train.as_mut(), &ts.io, &init, split, b, seed, eval)?;
            let status = match (r.diverged_at, r.eval_accuracy) {
                (Some(t), _) => format!("DIVERGED at step {t}"),
                (None, Some(acc)) => format!(
                    "last loss {:.4}, {} accuracy {:.2}%",
                    r.losses.last().copied().unwrap_or(f32::NAN),
                    a.split.name(),
                    100.0 * acc
                ),
                (None, None) => "not evaluated".into(),
            };
            eprintln!(
                "[{label}] seed {seed}: {} steps in {:.1}s, {status}",
                r.losses.len(),
                t0.elapsed().as_secs_f64()
            );
            results.runs.push(r);
        }
    }

    let csv = a.out.join("curves.csv");
    let summary_path = a.out.join("summary.json");
    let png = a.out.join("curves.png");
    results.write_curves_csv(&csv)?;
    results.write_summary_json(&summary_path)?;
    let opts = PlotOptions {
        smoothing: (a.steps / 200).max(1),
        log_y: true,
        ..PlotOptions::default()
    };
    let title = format!(
        "{problem_name}: minibatch loss on MNIST {} (mean over {} seeds)",
        a.split.name(),
        seeds.len()
    );
    let plotted = match plot_curves_with(&png, &title, &results.mean_curves(), &opts) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("metac eval: warning: no plot written: {e:#}");
            false
        }
    };
    let summary = results.summary();
    print!("{}", table(&summary.optimizers, a.split.name()));
    println!(
        "wrote {}, {}{}",
        csv.display(),
        summary_path.display(),
        if plotted {
            format!(", {}", png.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_names_parse() {
        assert_eq!(parse_optimizer("learned").unwrap(), OptSpec::Learned);
        match parse_optimizer("adam-1e-3").unwrap() {
            OptSpec::Baseline(l, Baseline::Adam(a)) => {
                assert_eq!(l, "adam-1e-3");
                assert_eq!(a.lr, 1e-3);
            }
            o => panic!("{o:?}"),
        }
        match parse_optimizer("adagrad-0.01").unwrap() {
            OptSpec::Baseline(_, Baseline::Adagrad(a)) => assert_eq!(a.lr, 0.01),
            o => panic!("{o:?}"),
        }
        for bad in [
            "adam",
            "adam-x",
            "nope-1e-3",
            "sgd--1",
            "sgd-0",
            "sgd-inf",
            "",
        ] {
            assert!(parse_optimizer(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_optimizers(DEFAULT_OPTIMIZERS).unwrap().len(), 6);
        assert!(parse_optimizers("adam-1e-3,adam-1e-3").is_err());
        assert!(parse_optimizers(",").is_err());
    }

    #[test]
    fn seeds_parse() {
        assert_eq!(parse_seeds("6, 12,18").unwrap(), vec![6, 12, 18]);
        for bad in ["", "1,,2", "a", "1,1", "-1"] {
            assert!(parse_seeds(bad).is_err(), "{bad}");
        }
    }
}
