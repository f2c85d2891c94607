//! `metac hessian`: trace, top eigenvalues and spectral density of the
//! Hessian of a loss at given parameters, on given data.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use metac_compiler::hessian::build_hvp;
use metac_compiler::metatest::to_onnx;
use metac_compiler::models::problems::{
    problem_by_name, problem_names, DataKind, OnnxProblem, Problem,
};
use metac_graphs::DType;
use metac_runtime::backend::{open_backend, Backend};
use metac_runtime::bundle::read_safetensors;
use metac_runtime::data::mnist::{self, Split};
use metac_runtime::fsutil::write_atomic;
use metac_runtime::hessian::{analyze, Chunk, HvpOperator, Settings};
use metac_runtime::metatest::{gather, host_tensor};
use metac_runtime::plot::plot_density;
use metac_runtime::tensor::HostTensor;
use ndarray::IxDyn;
use serde_json::{json, Value};

use crate::common::BackendArgs;

/// Examples used by default: the whole split, at most this many.
const DEFAULT_MAX_EXAMPLES: usize = 10_000;
/// Chunk size of the data when `--batch-size` is not given.
const DEFAULT_BATCH_SIZE: usize = 1000;
/// The density plot's floor, relative to its peak.
const PLOT_FLOOR: f64 = 1e-8;

fn after_help() -> String {
    format!(
        "Examples:\n  \
metac hessian --problem mnist-mlp --params eval/params/adam-1e-3-seed6.safetensors --out hs/adam\n  \
metac hessian --eval eval/ --out hs/              # every params file of a `metac eval` output\n  \
metac hessian --problem rosenbrock --params p.safetensors --out hs/rosen\n  \
metac hessian --problem mnist-mlp --init-seed 3 --split train --examples 5000 --out hs/init\n  \
metac hessian --model mlp.onnx --loss loss --out hs/onnx --probes 20 --slq-runs 4\n\n\
Problems: {}.\n\n\
Inputs: --problem NAME with --params FILE (a safetensors file with one f32 tensor per parameter under \
the problem's parameter names, as `metac eval` writes to EVAL/params/), or without --params the \
problem's initial parameters for --init-seed; --eval EVAL_DIR: every EVAL_DIR/params/*.safetensors, \
the problem and (unless --split is given) the split from EVAL_DIR/summary.json; --model FILE.onnx \
--loss OUTPUT: an ONNX model with a scalar loss output, whose float initializers are the parameters \
(values from the file, or from --params).\n\n\
Data: MNIST problems use the first --examples examples (default: the whole split, at most 10,000) of \
--split (default test) from --data-dir, in chunks of --batch-size (default 1000; the last chunk may be \
shorter and gets its own graph, so the loss, gradient and Hessian are exactly those of the mean over \
the examples). Data-free problems (quadratic, rosenbrock, ...) take no data and reject those flags. \
ONNX models: a model without data inputs is data-free; a model whose data inputs are one f32 image \
tensor [B,784] or [B,1,28,28] and one i64 label tensor [B] (any names) gets MNIST in chunks of its own \
static batch B (--batch-size must be B or left out; a remainder of --examples shorter than B is left \
out, `data.examples` says how many were used); other data inputs are not supported.\n\n\
Method: the Hessian is seen only through Hessian-vector products (one compiled forward-over-reverse \
HVP graph, run per chunk, f32); the estimators run on the host in f64. Trace: Hutchinson with \
--probes Rademacher probes (mean and standard error). Top eigenvalues: the --top largest Ritz values \
of --lanczos-steps Lanczos steps with full reorthogonalisation, with residual norms. Density: \
stochastic Lanczos quadrature, --slq-runs runs of --lanczos-steps steps from random unit vectors; \
nodes are the Ritz values, weights the squared first components of the tridiagonal eigenvectors; \
the density is the mean over runs of sum_j w_j N(t; node_j, sigma^2) on --grid points, with \
sigma = --sigma times the width of the spectrum (max node - min node), default 0.01. Lanczos steps \
are capped at the number of parameters. Cost: probes + steps * (1 + slq-runs) HVPs, each one graph \
run per chunk; memory: steps vectors of the parameter count in f64.\n\n\
Writes into OUT: hessian.json (problem or model, parameters file, number of parameters, data \
(split, examples, batch size), settings, loss and gradient norm, trace mean/stderr/samples, top \
eigenvalues with residuals and the smallest Ritz value, SLQ nodes and weights per run, the density \
grid) and density.png (log-scale density, clipped at 1e-8 of its peak). With --eval: \
OUT/<params file stem>/hessian.json and density.png per file, and OUT/summary.json comparing them \
(loss, gradient norm, trace, top eigenvalues per file).",
        problem_names().join(", ")
    )
}

/// Hessian spectra of a loss at given parameters: trace, top eigenvalues, density.
#[derive(clap::Args)]
#[command(after_help = after_help())]
pub struct Args {
    /// A named problem (see below).
    #[arg(long, conflicts_with_all = ["model", "eval"])]
    pub problem: Option<String>,
    /// An ONNX model (with --loss).
    #[arg(long, conflicts_with = "eval", requires = "loss")]
    pub model: Option<PathBuf>,
    /// The ONNX model's scalar loss output.
    #[arg(long, requires = "model")]
    pub loss: Option<String>,
    /// A `metac eval` output directory: analyse every params/*.safetensors.
    #[arg(long, conflicts_with = "params")]
    pub eval: Option<PathBuf>,
    /// Parameters (safetensors, one f32 tensor per parameter name).
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// Without --params: the problem's initial parameters for this seed.
    #[arg(long, conflicts_with_all = ["params", "eval", "model"])]
    pub init_seed: Option<u64>,
    /// MNIST split (MNIST problems only) [default: test, or the eval's split].
    #[arg(long, value_enum)]
    pub split: Option<Split3>,
    /// Number of examples, the first of the split [default: all, at most 10,000].
    #[arg(long)]
    pub examples: Option<usize>,
    /// MNIST directory (IDX files) [default: the shipped data/mnist].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Examples per graph run [default: 1000; ONNX models: their batch].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Hutchinson probes.
    #[arg(long, default_value_t = 100)]
    pub probes: usize,
    /// Number of top eigenvalues.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Lanczos steps (top eigenvalues and each SLQ run).
    #[arg(long, default_value_t = 50)]
    pub lanczos_steps: usize,
    /// SLQ runs.
    #[arg(long, default_value_t = 10)]
    pub slq_runs: usize,
    /// Density kernel width, relative to the spectrum's width.
    #[arg(long, default_value_t = 1e-2)]
    pub sigma: f64,
    /// Density grid points.
    #[arg(long, default_value_t = 1000)]
    pub grid: usize,
    /// Seed of the probes and Lanczos start vectors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split3 {
    Test,
    Validation,
    Train,
}

impl Split3 {
    fn name(self) -> &'static str {
        match self {
            Split3::Test => "test",
            Split3::Validation => "validation",
            Split3::Train => "train",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "test" => Some(Split3::Test),
            "validation" => Some(Split3::Validation),
            "train" => Some(Split3::Train),
            _ => None,
        }
    }
}

/// What the operator is built over: the problem(s) per chunk size and the data.
struct Setup {
    /// Label in reports: the problem name, or the model file.
    label: String,
    /// The problem of the full chunks (parameter names and shapes).
    problem: Box<dyn Problem>,
    operator: HvpOperator,
    data: Value,
}

fn settings(a: &Args) -> Result<Settings> {
    ensure!(a.probes >= 1, "--probes must be at least 1");
    ensure!(a.top >= 1, "--top must be at least 1");
    ensure!(a.lanczos_steps >= 1, "--lanczos-steps must be at least 1");
    ensure!(a.slq_runs >= 1, "--slq-runs must be at least 1");
    ensure!(
        a.sigma > 0.0 && a.sigma.is_finite(),
        "--sigma must be positive, got {}",
        a.sigma
    );
    ensure!(a.grid >= 2, "--grid must be at least 2");
    ensure!(a.batch_size != Some(0), "--batch-size must be at least 1");
    ensure!(a.examples != Some(0), "--examples must be at least 1");
    Ok(Settings {
        probes: a.probes,
        top: a.top,
        lanczos_steps: a.lanczos_steps,
        slq_runs: a.slq_runs,
        sigma: a.sigma,
        grid_points: a.grid,
        seed: a.seed,
    })
}

fn load_split(a: &Args, split: Split3) -> Result<Split> {
    let dir = a.data_dir.clone().unwrap_or_else(mnist::default_dir);
    let m = mnist::load(&dir)?;
    Ok(match split {
        Split3::Test => m.test,
        Split3::Validation => m.validation,
        Split3::Train => m.train,
    })
}

/// The split and the number of its examples to use (`--examples`, default
/// all up to 10,000).
fn load_examples(a: &Args, choice: Split3) -> Result<(Split, usize)> {
    let data = load_split(a, choice)?;
    let n = a.examples.unwrap_or(data.len().min(DEFAULT_MAX_EXAMPLES));
    ensure!(
        n <= data.len(),
        "--examples {n} is more than the {} examples of the MNIST {} split",
        data.len(),
        choice.name()
    );
    Ok((data, n))
}

fn reject_data_flags(a: &Args, what: &str) -> Result<()> {
    let given: Vec<&str> = [
        (a.split.is_some(), "--split"),
        (a.data_dir.is_some(), "--data-dir"),
        (a.batch_size.is_some(), "--batch-size"),
        (a.examples.is_some(), "--examples"),
    ]
    .into_iter()
    .filter_map(|(g, f)| g.then_some(f))
    .collect();
    ensure!(
        given.is_empty(),
        "{what} is data-free (no data inputs), so {} does not apply; leave it out",
        given.join(", ")
    );
    Ok(())
}

fn load_graph(
    backend: &dyn Backend,
    problem: &dyn Problem,
    label: &str,
) -> Result<Box<dyn metac_runtime::backend::Session>> {
    let h = build_hvp(problem);
    let onnx = to_onnx(&h.graph, "hvp").map_err(anyhow::Error::msg)?;
    backend
        .load(&onnx, label)
        .with_context(|| format!("loading the HVP graph ({label})"))
}

/// A named problem, with its data.
fn setup_problem(
    a: &Args,
    name: &str,
    split: Option<Split3>,
    backend: &dyn Backend,
) -> Result<Setup> {
    let probe = problem_by_name(name, 1).map_err(anyhow::Error::msg)?;
    match probe.needs_data() {
        None => {
            reject_data_flags(a, &format!("problem '{name}'"))?;
            let s = load_graph(backend, probe.as_ref(), "hvp")?;
            let io = metac_runtime::hessian::HvpIo::new(&probe.param_shapes(), vec![]);
            Ok(Setup {
                label: name.into(),
                operator: HvpOperator::new(vec![s], io, vec![])?,
                problem: probe,
                data: Value::Null,
            })
        }
        Some(DataKind::Mnist) => {
            let choice = split.unwrap_or(Split3::Test);
            let (data, n) = load_examples(a, choice)?;
            let b = a.batch_size.unwrap_or(DEFAULT_BATCH_SIZE).min(n);
            let (full, rem) = (n / b, n % b);
            let problem = problem_by_name(name, b).map_err(anyhow::Error::msg)?;
            let mut sessions = vec![load_graph(
                backend,
                problem.as_ref(),
                &format!("hvp (batch {b})"),
            )?];
            if rem > 0 {
                let p = problem_by_name(name, rem).map_err(anyhow::Error::msg)?;
                sessions.push(load_graph(
                    backend,
                    p.as_ref(),
                    &format!("hvp (batch {rem})"),
                )?);
            }
            let mut chunks: Vec<Chunk> = (0..full)
                .map(|c| {
                    let (x, y) = gather(&data, c * b..(c + 1) * b);
                    Chunk {
                        session: 0,
                        batch: vec![x, y],
                        examples: b,
                    }
                })
                .collect();
            if rem > 0 {
                let (x, y) = gather(&data, full * b..n);
                chunks.push(Chunk {
                    session: 1,
                    batch: vec![x, y],
                    examples: rem,
                });
            }
            let io = metac_runtime::hessian::HvpIo::new(
                &problem.param_shapes(),
                problem
                    .batch_inputs()
                    .into_iter()
                    .map(|(n, _, _)| n)
                    .collect(),
            );
            let nchunks = chunks.len();
            Ok(Setup {
                label: name.into(),
                operator: HvpOperator::new(sessions, io, chunks)?,
                problem,
                data: json!({
                    "dataset": "mnist",
                    "split": choice.name(),
                    "examples": n,
                    "batch_size": b,
                    "chunks": nchunks,
                }),
            })
        }
    }
}

/// An ONNX model, with MNIST where its data inputs look like it.
fn setup_model(a: &Args, path: &Path, loss: &str, backend: &dyn Backend) -> Result<Setup> {
    let label = path.display().to_string();
    let problem = OnnxProblem::from_file(path, loss)
        .map_err(anyhow::Error::msg)
        .with_context(|| label.clone())?;
    let inputs = problem.batch_inputs();
    let io = metac_runtime::hessian::HvpIo::new(
        &problem.param_shapes(),
        inputs.iter().map(|(n, _, _)| n.clone()).collect(),
    );
    if inputs.is_empty() {
        reject_data_flags(a, &format!("model {label}"))?;
        let s = load_graph(backend, &problem, "hvp")?;
        return Ok(Setup {
            label,
            operator: HvpOperator::new(vec![s], io, vec![])?,
            problem: Box::new(problem),
            data: Value::Null,
        });
    }
    let describe = || {
        inputs
            .iter()
            .map(|(n, d, s)| format!("{n} {}{s:?}", d.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let image = |s: &[usize]| s.len() == 2 && s[1] == 784 || s.len() == 4 && s[1..] == [1, 28, 28];
    let xi = inputs
        .iter()
        .position(|(_, d, s)| *d == DType::F32 && image(s));
    let yi = inputs
        .iter()
        .position(|(_, d, s)| *d == DType::I64 && s.len() == 1);
    let (Some(xi), Some(yi), 2) = (xi, yi, inputs.len()) else {
        bail!(
            "{label}: data inputs {} are not MNIST-like; metac hessian feeds MNIST to models whose data inputs \
are one f32 image tensor [B,784] or [B,1,28,28] and one i64 label tensor [B], and runs models without data inputs",
            describe()
        );
    };
    let xshape = inputs[xi].2.clone();
    let b = xshape[0];
    ensure!(
        inputs[yi].2[0] == b,
        "{label}: data inputs {} have different batch sizes",
        describe()
    );
    ensure!(
        a.batch_size.is_none_or(|s| s == b),
        "--batch-size {} differs from the model's static batch {b}; leave it out",
        a.batch_size.unwrap_or(0)
    );
    let choice = a.split.unwrap_or(Split3::Test);
    let (data, n) = load_examples(a, choice)?;
    let full = n / b;
    ensure!(
        full >= 1,
        "--examples {n} is fewer than the model's batch of {b}"
    );
    let chunks = (0..full)
        .map(|c| {
            let (x, y) = gather(&data, c * b..(c + 1) * b);
            let x = HostTensor::F32(
                x.into_f32()?
                    .into_shape_with_order(IxDyn(&xshape))
                    .context("reshaping images")?,
            );
            let mut batch = vec![x.clone(), x];
            batch[yi] = y;
            Ok(Chunk {
                session: 0,
                batch,
                examples: b,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let s = load_graph(backend, &problem, "hvp")?;
    Ok(Setup {
        label,
        operator: HvpOperator::new(vec![s], io, chunks)?,
        problem: Box::new(problem),
        data: json!({
            "dataset": "mnist",
            "split": choice.name(),
            "examples": full * b,
            "examples_requested": n,
            "batch_size": b,
            "chunks": full,
        }),
    })
}

/// The parameters in `file`, checked against the problem's names and shapes.
fn read_params(file: &Path, problem: &dyn Problem, label: &str) -> Result<Vec<HostTensor>> {
    let f = file.display();
    let bytes = std::fs::read(file).with_context(|| format!("reading {f}"))?;
    let mut tensors = read_safetensors(&bytes, &f.to_string())?;
    let shapes = problem.param_shapes();
    let mut out = vec![];
    for (name, shape) in &shapes {
        let t = tensors.remove(name).with_context(|| {
            format!("{f}: no tensor '{name}' ({label} expects '{name}' f32{shape:?})")
        })?;
        ensure!(
            t.dtype() == DType::F32,
            "{f}: tensor '{name}' is {}, but {label} expects f32{shape:?}",
            t.dtype().name()
        );
        ensure!(
            &t.shape == shape,
            "{f}: tensor '{name}' has shape {:?}, but {label} expects {shape:?}",
            t.shape
        );
        out.push(host_tensor(&t));
    }
    if let Some(extra) = tensors.keys().next() {
        bail!(
            "{f}: unexpected tensor '{extra}' ({label} has parameters {})",
            shapes
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

/// Analyses the operator at `params`; writes `dir/hessian.json` and
/// `dir/density.png`; returns the JSON.
fn analyse_one(
    setup: &mut Setup,
    params: Vec<HostTensor>,
    source: Value,
    s: &Settings,
    dir: &Path,
    backend: &str,
) -> Result<Value> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    setup.operator.set_params(params)?;
    let runs0 = setup.operator.graph_runs();
    let (loss, grad_norm) = setup.operator.loss_and_grad_norm()?;
    ensure!(
        loss.is_finite(),
        "the loss at these parameters is not finite ({loss})"
    );
    let a = analyze(&mut setup.operator, s, &mut |m| eprintln!("  {m}"))?;
    let n = setup.problem.num_params();
    let report = json!({
        "problem": setup.label,
        "params": source,
        "num_params": n,
        "data": setup.data,
        "backend": backend,
        "settings": s,
        "lanczos_steps_taken": a.top.steps,
        "loss": loss,
        "grad_norm": grad_norm,
        "trace": a.trace,
        "top_eigenvalues": a.top,
        "slq": a.slq,
        "density": a.density,
        "hvps": a.hvps,
        "graph_runs": setup.operator.graph_runs() - runs0,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let path = dir.join("hessian.json");
    write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let png = dir.join("density.png");
    let pts: Vec<(f64, f64)> = a
        .density
        .grid
        .iter()
        .copied()
        .zip(a.density.density.iter().copied())
        .collect();
    if let Err(e) = plot_density(
        &png,
        &format!("{}: Hessian spectral density (SLQ)", setup.label),
        &[("density".into(), pts)],
        PLOT_FLOOR,
    ) {
        eprintln!("metac hessian: warning: no plot written: {e:#}");
    }
    let se = a
        .trace
        .stderr
        .map(|x| format!(" ± {x:.4}"))
        .unwrap_or_default();
    println!(
        "{}: loss {loss:.5}, |grad| {grad_norm:.4e}, trace {:.4}{se}, top eigenvalues [{}], min Ritz value {:.4} ({} HVPs, {:.1}s)",
        dir.display(),
        a.trace.mean,
        a.top
            .values
            .iter()
            .map(|v| format!("{v:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
        a.top.min_value,
        a.hvps,
        t0.elapsed().as_secs_f64()
    );
    Ok(report)
}

/// Problem name and split of a `metac eval` directory.
fn eval_info(dir: &Path) -> Result<(String, Option<String>)> {
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (is {} a `metac eval` output?)",
            p.display(),
            dir.display()
        )
    })?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    let problem = v["problem"]
        .as_str()
        .with_context(|| format!("{}: no string key \"problem\"", p.display()))?
        .to_string();
    Ok((problem, v["split"].as_str().map(str::to_string)))
}

fn params_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let pdir = dir.join("params");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pdir)
        .with_context(|| format!("reading {}", pdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no .safetensors files",
        pdir.display()
    );
    Ok(files)
}

pub fn run(a: Args) -> Result<()> {
    let s = settings(&a)?;
    let backend = open_backend(&a.backend.options())?;
    let bname = backend.name();
    if let Some(eval) = &a.eval {
        let (problem, split) = eval_info(eval)?;
        let files = params_files(eval)?;
        let split = match (a.split, split) {
            (Some(s), _) => Some(s),
            (None, Some(s)) => Split3::parse(&s),
            (None, None) => None,
        };
        let mut setup = setup_problem(&a, &problem, split, backend.as_ref())?;
        eprintln!(
            "metac hessian: {problem}, {} parameter files from {}, {} parameters, {bname}",
            files.len(),
            eval.display(),
            setup.problem.num_params()
        );
        let mut rows = vec![];
        for f in &files {
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            eprintln!("[{stem}]");
            let label = format!("problem '{problem}'");
            let params = read_params(f, setup.problem.as_ref(), &label)?;
            let r = analyse_one(
                &mut setup,
                params,
                json!({ "file": f.display().to_string() }),
                &s,
                &a.out.join(&stem),
                bname,
            )?;
            rows.push(json!({
                "file": stem,
                "loss": r["loss"],
                "grad_norm": r["grad_norm"],
                "trace_mean": r["trace"]["mean"],
                "trace_stderr": r["trace"]["stderr"],
                "top_eigenvalue": r["top_eigenvalues"]["values"][0],
                "top_eigenvalues": r["top_eigenvalues"]["values"],
                "min_ritz_value": r["top_eigenvalues"]["min_value"],
            }));
        }
        let summary = json!({
            "problem": problem,
            "eval_dir": eval.display().to_string(),
            "num_params": setup.problem.num_params(),
            "data": setup.data,
            "settings": s,
            "files": rows,
        });
        let p = a.out.join("summary.json");
        write_atomic(&p, serde_json::to_string_pretty(&summary)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
        println!(
            "{:<32} {:>10} {:>12} {:>22} {:>12}",
            "file", "loss", "|grad|", "trace (± stderr)", "top eig"
        );
        for r in &rows {
            println!(
                "{:<32} {:>10.5} {:>12.4e} {:>22} {:>12.4}",
                r["file"].as_str().unwrap_or(""),
                r["loss"].as_f64().unwrap_or(f64::NAN),
                r["grad_norm"].as_f64().unwrap_or(f64::NAN),
                format!(
                    "{:.3} ± {:.3}",
                    r["trace_mean"].as_f64().unwrap_or(f64::NAN),
                    r["trace_stderr"].as_f64().unwrap_or(f64::NAN)
                ),
                r["top_eigenvalue"].as_f64().unwrap_or(f64::NAN),
            );
        }
        println!("wrote {}", p.display());
        return Ok(());
    }
    let (mut setup, label) = match (&a.problem, &a.model) {
        (Some(p), None) => (
            setup_problem(&a, p, a.split, backend.as_ref())?,
            format!("problem '{p}'"),
        ),
        (None, Some(m)) => {
            let loss = a.loss.as_deref().context("--model needs --loss")?;
            (
                setup_model(&a, m, loss, backend.as_ref())?,
                format!("model {}", m.display()),
            )
        }
        _ => {
            bail!("give one of --problem NAME, --model FILE.onnx --loss OUTPUT, or --eval EVAL_DIR")
        }
    };
    let (params, source) = match &a.params {
        Some(f) => (
            read_params(f, setup.problem.as_ref(), &label)?,
            json!({ "file": f.display().to_string() }),
        ),
        None if a.model.is_some() => (
            setup
                .problem
                .init_params(0)
                .iter()
                .map(host_tensor)
                .collect(),
            json!({ "initializers": a.model.as_ref().map(|m| m.display().to_string()) }),
        ),
        None => {
            let seed = a.init_seed.unwrap_or(0);
            (
                setup
                    .problem
                    .init_params(seed)
                    .iter()
                    .map(host_tensor)
                    .collect(),
                json!({ "init_seed": seed }),
            )
        }
    };
    eprintln!(
        "metac hessian: {}, {} parameters{}, {bname}",
        setup.label,
        setup.problem.num_params(),
        match setup.data.get("examples") {
            Some(n) => format!(
                ", {n} MNIST {} examples",
                setup.data["split"].as_str().unwrap_or("")
            ),
            None => ", data-free".into(),
        }
    );
    analyse_one(&mut setup, params, source, &s, &a.out, bname)?;
    println!(
        "wrote {}, {}",
        a.out.join("hessian.json").display(),
        a.out.join("density.png").display()
    );
    Ok(())
}
