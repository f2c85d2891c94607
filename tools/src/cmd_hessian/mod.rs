//! `metac hessian`: trace, top eigenvalues and spectral density of the
//! Hessian of a loss at given parameters, on given data.
//!
//! `setup`: the problem or ONNX model and its data, as an HVP operator;
//! `report`: one analysis written as JSON and a density plot; `eval_dir`:
//! every parameter file of a `metac eval` output, with a summary.

mod eval_dir;
mod report;
mod setup;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use metac_compiler::models::problems::problem_names;
use metac_runtime::backend::open_backend;
use metac_runtime::tensor::HostTensor;
use serde_json::json;

use crate::common::BackendArgs;
use report::analyse_one;
use setup::{read_params, settings, setup_model, setup_problem};

/// Examples used by default: the whole split, at most this many.
const DEFAULT_MAX_EXAMPLES: usize = 10_000;
/// Chunk size of the data when `--batch-size` is not given.
const DEFAULT_BATCH_SIZE: usize = 1000;

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
(loss, gradient norm, trace, top eigenvalues per file, and their mean and std per optimizer over its \
seeds, files being named <optimizer>-seed<N> as `metac eval` writes them).",
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

pub fn run(a: Args) -> Result<()> {
    let s = settings(&a)?;
    let backend = open_backend(&a.backend.options())?;
    let bname = backend.name();
    if let Some(eval) = &a.eval {
        return eval_dir::run(&a, eval, &s, backend.as_ref());
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
                .map(HostTensor::from_graph)
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
                    .map(HostTensor::from_graph)
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
