//! `metac eval`: meta-test the frozen learned optimizer of a run against
//! hand-designed baselines on a problem: an MNIST problem or a data-free
//! synthetic one (quadratic, Rosenbrock, ...).
//!
//! On the bundle's own problem and batch sizes the bundle's compiled steps
//! and evaluation run, with initial values drawn from its init rules
//! (`meta.l2o.metatest`); any other problem or size builds its graphs here.
//! Per seed every optimizer starts from the same initial parameters
//! (`problem.init_params(seed)`) and, for MNIST problems, sees the same
//! minibatches (`Batches::generate(split size, batch, steps, seed)`); the
//! final parameters are evaluated on the whole split (MNIST) or by the loss
//! itself (data-free problems). Writes `curves.csv`, `summary.json`,
//! `curves.png` and `params/<optimizer>-seed<seed>.safetensors` into
//! `--out`, and prints a table.

mod data;
mod optimizers;

pub use optimizers::PhiChoice;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_compiler::l2o::config::L2oConfig;
use metac_compiler::l2o::program::compile_l2o;
use metac_compiler::metatest::{
    build_evaluate, build_train_step, run_init, to_onnx, MetaOptimizer,
};
use metac_compiler::models::hrnn::Hrnn;
use metac_compiler::models::problems::{problem_by_name, problem_names, Problem};
use metac_contract::bundle::Bundle;
use metac_contract::init::draw_all;
use metac_contract::io::RunInit;
use metac_contract::l2o::{L2oMeta, MetatestStep, NEXT};
use metac_runtime::backend::open_backend;
use metac_runtime::backend::Session;
use metac_runtime::metatest::{
    params_path, run_optimizer, write_params, Evaluation, MetaTestResults, StepData,
};
use metac_runtime::plot::{plot_curves_with, PlotOptions};
use metac_runtime::tensor::HostTensor;

use crate::common::BackendArgs;
use crate::table::table;
use data::{needs_mnist, MnistData};
use optimizers::{load_learned, parse_optimizers, parse_seeds, OptSpec, DEFAULT_OPTIMIZERS};

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

/// The L2O config a pretrained optimizer's directory holds.
const CONFIG: &str = "config.toml";

/// Minibatch size of MNIST problems when `--batch-size` is not given.
pub const DEFAULT_BATCH_SIZE: usize = 128;
/// Evaluation chunk size of MNIST problems when `--eval-batch-size` is not given.
pub const DEFAULT_EVAL_BATCH_SIZE: usize = 1000;

fn after_help() -> String {
    format!(
        "Examples:\n  \
metac eval runs/seed --bundle bundles/seed --problem mnist-mlp-relu --steps 10000 --seeds 6,12,18,24,30 --out eval/relu\n  \
metac eval --learned pretrained/l2o-mnist-mlp --problem mnist-convnet --steps 1000 --optimizers learned,adam-1e-2 --out eval/pretrained\n  \
metac eval --problem mnist-mlp --optimizers adam-1e-3,sgd-1e-1 --steps 2000 --out eval/baselines\n  \
metac eval runs/seed --bundle bundles/seed --problem rosenbrock --optimizers learned,adam-1e-2 --steps 1000 --out eval/rosenbrock\n\n\
Problems: {}.\n\n\
Optimizers: `learned` (the run's meta-parameters; needs RUN or --learned, and --bundle unless the \
directory holds its config.toml, as pretrained/ optimizers do) and NAME-LR with NAME one of \
adam, sgd, rmsprop, adagrad (e.g. adam-1e-3). Per seed, every optimizer starts from the same initial \
parameters. On MNIST problems (mnist-*) every optimizer sees the same minibatches of --split and the \
final parameters are evaluated on the whole split. The other problems are data-free (any data is baked \
into the loss): no minibatches and no split, the evaluation is the loss at the final parameters (and \
the accuracy where the problem is a classifier, softmax-regression-random); --split, --data-dir, \
--batch-size and --eval-batch-size are rejected for them.\n\n\
Writes into OUT:\n  \
curves.csv    optimizer,seed,step,loss: the (minibatch) loss at the parameters before each step\n  \
summary.json  problem, steps, split and batch_size (null for data-free problems), and per optimizer \
the mean and std over seeds of the final loss (last 100 steps), the loss at 1,000 steps, the evaluation \
loss and accuracy (null where the problem is not a classifier), and how many runs diverged and at \
which steps (a run diverges at the first step whose loss is non-finite or above 10x its first step's; \
it is left out of the statistics)\n  \
curves.png    mean curves over seeds (log scale where every loss is positive); diverged runs as curves \
of their own, labelled with their steps\n  \
params/OPTIMIZER-seedSEED.safetensors  the final parameters of every run that did not diverge, one \
tensor per parameter under the problem's parameter names (written atomically; nothing for a diverged \
run, whose file from an earlier eval into OUT is removed)",
        problem_names().join(", ")
    )
}

/// Meta-test the learned optimizer of a run against baselines.
#[derive(clap::Args)]
#[command(after_help = after_help())]
pub struct Args {
    /// Run directory of `metac run`, or a pretrained optimizer such as
    /// `pretrained/l2o-mnist-mlp` (needed for the `learned` optimizer).
    pub run: Option<PathBuf>,
    /// The same as RUN, by name: a pretrained optimizer (a directory with
    /// `best.safetensors` and the `config.toml` it was meta-trained with).
    #[arg(long, conflicts_with = "run", value_name = "DIR")]
    pub learned: Option<PathBuf>,
    /// The bundle the run meta-trained (gives the learned optimizer's
    /// config). Without it, a RUN that holds its `config.toml` (as a
    /// pretrained optimizer does) has its bundle compiled into OUT/bundle.
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
    /// Minibatch size (MNIST problems only) [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Evaluation chunk size, clamped to the split size (MNIST problems only)
    /// [default: 1000].
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// MNIST split for the batches and the final evaluation (MNIST problems
    /// only) [default: test].
    #[arg(long, value_enum)]
    pub split: Option<SplitChoice>,
    /// MNIST directory (IDX files, gzip or raw; MNIST problems only);
    /// default: the shipped data/mnist.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory (required to meta-test; for an edited model it
    /// defaults to EDITED).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An edited model (EDITED from `metac edit`): the facts to score it on
    /// (JSON lines; default: EDITED/facts.jsonl, the edits it was given).
    #[arg(long)]
    pub facts: Option<PathBuf>,
    /// Build every graph here, even where the bundle has it (on its own
    /// problem and batch sizes it runs its compiled steps and evaluation).
    #[arg(long)]
    pub compile: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The learned optimizer (for a train step built here, on another problem
/// than the bundle's): its architecture from the bundle's compile config.
fn learned_optimizer(bundle: Option<&Bundle>) -> Result<Hrnn> {
    let b = bundle.context("the optimizer 'learned' needs --bundle BUNDLE")?;
    Ok(Hrnn::new(
        crate::common::bundle_config(b)?.optimizer.hrnn_config(),
    ))
}

/// Where optimizer `step` of the bundle starts for `seed`, from the
/// bundle's init rules: the problem's parameters and the optimizer's state;
/// for the learned optimizer (weights `phi`) the hidden states are then set
/// from its weights by the bundle's `reset` graph.
fn bundle_init(
    label: &str,
    meta: &L2oMeta,
    step: &MetatestStep,
    phi: &[(String, metac_graphs::Tensor)],
    seed: u64,
    reset: Option<&mut Box<dyn Session>>,
) -> Result<RunInit> {
    let params = draw_all(&meta.init.theta, seed)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let mut state = draw_all(&step.state, seed);
    if !phi.is_empty() {
        let reset =
            reset.context("the bundle's reset graph is loaded for the learned optimizer")?;
        let host: Vec<(String, HostTensor)> = phi
            .iter()
            .chain(state.iter())
            .map(|(n, t)| (n.clone(), HostTensor::from_graph(t)))
            .collect();
        let names = reset.input_names();
        let ins: Vec<(&str, &HostTensor)> = host
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        for (n, t) in reset.run(&ins)? {
            let name = n.strip_prefix(NEXT).unwrap_or(&n);
            if meta.layout.hidden.iter().any(|h| h == name) {
                if let Some(e) = state.iter_mut().find(|(m, _)| m == name) {
                    e.1 = t.to_graph();
                }
            }
        }
    }
    Ok(RunInit {
        optimizer: label.into(),
        params,
        state: state.into_iter().map(|(_, t)| t).collect(),
        phi: phi.iter().map(|(_, t)| t.clone()).collect(),
    })
}

/// Writes the final parameters of a run, or for a diverged run removes a
/// file left from an earlier eval into the same directory.
fn save_params(
    out: &Path,
    label: &str,
    seed: u64,
    diverged: bool,
    names: &[String],
    params: &[HostTensor],
) -> Result<()> {
    let path = params_path(out, label, seed);
    if !diverged {
        return write_params(&path, names, params);
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing stale {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub fn run(a: Args) -> Result<()> {
    // An edited language model rather than a learned optimizer's run.
    if let Some(dir) = a
        .run
        .as_deref()
        .filter(|d| d.join(crate::cmd_edit::EDIT_RECORD).is_file())
    {
        return crate::cmd_edit::eval_edited(dir, a.facts.as_deref(), a.out.as_deref(), &a.backend);
    }
    ensure!(
        a.facts.is_none(),
        "--facts scores an edited model (a directory of `metac edit`); {} is not one",
        a.run
            .as_deref()
            .map_or("no RUN".into(), |r| r.display().to_string())
    );
    let out = a
        .out
        .clone()
        .context("--out (the output directory) is required to meta-test an optimizer")?;
    // Validate every input before loading anything.
    let specs = parse_optimizers(&a.optimizers)?;
    let seeds = parse_seeds(&a.seeds)?;
    ensure!(a.steps > 0, "--steps must be at least 1");
    let run_dir = a.run.clone().or_else(|| a.learned.clone());
    let bundle_dir = match (&a.bundle, &run_dir) {
        (Some(b), _) => Some(b.clone()),
        // A pretrained optimizer carries the config it was meta-trained
        // with: its bundle (the optimizer's shape) is compiled here.
        (None, Some(r)) if specs.contains(&OptSpec::Learned) && r.join(CONFIG).is_file() => {
            let cfg = L2oConfig::load(&r.join(CONFIG))?;
            let dir = out.join("bundle");
            compile_l2o(&cfg, &dir)
                .with_context(|| format!("compiling the bundle of {}", r.join(CONFIG).display()))?;
            eprintln!(
                "metac eval: compiled the learned optimizer's bundle from {} into {}",
                r.join(CONFIG).display(),
                dir.display()
            );
            Some(dir)
        }
        _ => None,
    };
    let bundle = bundle_dir.as_deref().map(Bundle::load).transpose()?;
    let meta = match &bundle {
        Some(b) => Some(
            L2oMeta::from_manifest(&b.manifest).with_context(|| format!("{}", b.dir.display()))?,
        ),
        None => None,
    };
    let problem_name = match (&a.problem, &meta) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => m.problem.clone(),
        (None, None) => "mnist-mlp".into(),
    };
    let batch_size = a.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    let problem: Box<dyn Problem> =
        problem_by_name(&problem_name, batch_size).map_err(anyhow::Error::msg)?;
    let mnist_problem = needs_mnist(&a, problem.as_ref())?;
    let learned = if specs.contains(&OptSpec::Learned) {
        Some(load_learned(run_dir.as_deref(), bundle.as_ref(), a.phi)?)
    } else {
        None
    };

    let data = if mnist_problem {
        Some(MnistData::load(&a, &seeds)?)
    } else {
        None
    };
    // The bundle's own graphs serve an eval on its problem with its batch
    // sizes (unless --compile): nothing of the program is rebuilt.
    let own = match (bundle.as_ref(), meta.as_ref()) {
        (Some(b), Some(m))
            if !a.compile
                && m.problem == problem_name
                && match &data {
                    Some(d) => {
                        d.batch_size == m.batch_size
                            && d.eval_batch_size == m.metatest.evaluate_io.batch_size
                    }
                    None => m.data.is_none(),
                } =>
        {
            Some((b, m))
        }
        _ => None,
    };
    let backend = open_backend(&a.backend.options())?;
    let (mut eval_sess, eval_io) = match own {
        Some((b, m)) => (
            backend.load(&b.graph_bytes(&m.metatest.evaluate)?, "evaluate")?,
            m.metatest.evaluate_io.clone(),
        ),
        None => {
            let eval_graph = match &data {
                Some(d) => build_evaluate(
                    problem_by_name(&problem_name, d.eval_batch_size)
                        .map_err(anyhow::Error::msg)?
                        .as_ref(),
                ),
                None => build_evaluate(problem.as_ref()),
            };
            let s = backend.load(
                &to_onnx(&eval_graph.graph, "evaluate").map_err(anyhow::Error::msg)?,
                "evaluate",
            )?;
            (s, eval_graph.io)
        }
    };
    // The learned optimizer's hidden states start from its weights: the
    // bundle's `reset` graph sets them where the bundle's step runs.
    let mut reset_sess = match own {
        Some((b, _)) if learned.is_some() => Some(backend.load(&b.graph_bytes("reset")?, "reset")?),
        _ => None,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let on = match &data {
        Some(d) => format!(
            "MNIST {} ({} examples), batch {}",
            d.choice.name(),
            d.split.len(),
            d.batch_size
        ),
        None => format!("data-free, {} parameters", problem.num_params()),
    };
    eprintln!(
        "metac eval: {problem_name} ({on}), {} optimizers x {} seeds x {} steps, {} ({})",
        specs.len(),
        seeds.len(),
        a.steps,
        backend.name(),
        a.backend.device
    );
    let split_name = data.as_ref().map(|d| d.choice.name());
    let eval_name = split_name.unwrap_or("final-parameter");

    let mut results = MetaTestResults {
        problem: problem_name.clone(),
        split: data.as_ref().map(|d| d.choice.name().to_string()),
        batch_size: data.as_ref().map(|d| d.batch_size),
        steps: a.steps,
        runs: vec![],
    };
    let no_phi: Vec<(String, metac_graphs::Tensor)> = vec![];
    for spec in &specs {
        let label = spec.label();
        let phi = match spec {
            OptSpec::Learned => learned.as_ref().expect("loaded above"),
            OptSpec::Baseline(..) => &no_phi,
        };
        let t0 = Instant::now();
        let bundled = own.and_then(|(b, m)| m.metatest.step(label).map(|s| (b, m, s)));
        let (onnx, io, how, built) = match bundled {
            Some((b, _, step)) => (
                b.graph_bytes(&step.graph)?,
                step.io.clone(),
                format!("loaded {} from the bundle", step.graph),
                None,
            ),
            None => {
                let opt = match spec {
                    OptSpec::Learned => MetaOptimizer::Hrnn(learned_optimizer(bundle.as_ref())?),
                    OptSpec::Baseline(_, b) => MetaOptimizer::Baseline(*b),
                };
                let ts = build_train_step(problem.as_ref(), &opt);
                (
                    to_onnx(&ts.graph, "train_step").map_err(anyhow::Error::msg)?,
                    ts.io,
                    "built train_step".to_string(),
                    Some(opt),
                )
            }
        };
        let mut train = backend
            .load(&onnx, &format!("train_step ({label})"))
            .with_context(|| format!("loading train_step for {label}"))?;
        eprintln!("[{label}] {how} in {:.1}s", t0.elapsed().as_secs_f64());
        for (i, &seed) in seeds.iter().enumerate() {
            let t0 = Instant::now();
            let init = match (&built, bundled) {
                (Some(opt), _) => run_init(label, problem.as_ref(), opt, phi, seed),
                (None, Some((_, m, step))) => {
                    bundle_init(label, m, step, phi, seed, reset_sess.as_mut())?
                }
                (None, None) => unreachable!("a step is built or the bundle's"),
            };
            let step_data = match &data {
                Some(d) => StepData::Mnist {
                    split: &d.split,
                    batches: &d.batches[i],
                },
                None => StepData::DataFree { steps: a.steps },
            };
            let eval = Evaluation {
                session: eval_sess.as_mut(),
                io: &eval_io,
                split: data.as_ref().map(|d| &d.split),
            };
            let (r, params) =
                run_optimizer(train.as_mut(), &io, &init, step_data, seed, Some(eval))?;
            save_params(&out, label, seed, r.diverged(), &io.params, &params)?;
            let status = match (r.diverged_at, r.eval_loss) {
                (Some(t), _) => format!("DIVERGED at step {t}"),
                (None, Some(l)) => format!(
                    "last loss {:.4}, {eval_name} loss {l:.4}{}",
                    r.losses.last().copied().unwrap_or(f32::NAN),
                    r.eval_accuracy
                        .map(|acc| format!(", {eval_name} accuracy {:.2}%", 100.0 * acc))
                        .unwrap_or_default()
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

    let csv = out.join("curves.csv");
    let summary_path = out.join("summary.json");
    let png = out.join("curves.png");
    results.write_curves_csv(&csv)?;
    results.write_summary_json(&summary_path)?;
    // A log scale where every loss is positive (not so for e.g. styblinski-tang).
    let curves = results.mean_curves();
    let opts = PlotOptions {
        smoothing: (a.steps / 200).max(1),
        log_y: curves.iter().all(|(_, c)| c.iter().all(|&(_, y)| y > 0.0)),
        y_label: if data.is_some() {
            "minibatch loss"
        } else {
            "loss"
        }
        .into(),
        ..PlotOptions::default()
    };
    let title = match &data {
        Some(d) => format!(
            "{problem_name}: minibatch loss on MNIST {} (mean over {} seeds)",
            d.choice.name(),
            seeds.len()
        ),
        None => format!("{problem_name}: loss (mean over {} seeds)", seeds.len()),
    };
    let plotted = match plot_curves_with(&png, &title, &curves, &opts) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("metac eval: warning: no plot written: {e:#}");
            false
        }
    };
    let summary = results.summary();
    print!("{}", table(&summary.optimizers, split_name));
    println!(
        "wrote {}, {}{}, {}",
        csv.display(),
        summary_path.display(),
        if plotted {
            format!(", {}", png.display())
        } else {
            String::new()
        },
        out.join("params").display()
    );
    Ok(())
}
