//! The operator `metac hessian` analyses: a named problem or an ONNX model,
//! its HVP graph per chunk size, and the data (MNIST chunks, or none).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use metac_compiler::hessian::build_hvp;
use metac_compiler::metatest::to_onnx;
use metac_compiler::models::problems::{problem_by_name, OnnxProblem, Problem};
use metac_contract::bundle::read_safetensors;
use metac_contract::io::HvpIo;
use metac_contract::l2o::DataKind;
use metac_graphs::DType;
use metac_runtime::backend::Backend;
use metac_runtime::data::mnist::{self, Split};
use metac_runtime::hessian::{Chunk, HvpOperator, Settings};
use metac_runtime::metatest::gather;
use metac_runtime::tensor::HostTensor;
use ndarray::IxDyn;
use serde_json::{json, Value};

use super::{Args, Split3, DEFAULT_BATCH_SIZE, DEFAULT_MAX_EXAMPLES};

/// What the operator is built over: the problem(s) per chunk size and the data.
pub(super) struct Setup {
    /// Label in reports: the problem name, or the model file.
    pub label: String,
    /// The problem of the full chunks (parameter names and shapes).
    pub problem: Box<dyn Problem>,
    pub operator: HvpOperator,
    pub data: Value,
}

pub(super) fn settings(a: &Args) -> Result<Settings> {
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
pub(super) fn setup_problem(
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
            let io = HvpIo::new(&probe.param_shapes(), vec![]);
            Ok(Setup {
                label: name.into(),
                operator: HvpOperator::new(vec![s], io, vec![])?,
                problem: probe,
                data: Value::Null,
            })
        }
        Some(DataKind::Facts) => anyhow::bail!(
            "problem '{name}' is a language model on the fact world, which metac hessian does not load"
        ),
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
            let io = HvpIo::new(
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
pub(super) fn setup_model(
    a: &Args,
    path: &Path,
    loss: &str,
    backend: &dyn Backend,
) -> Result<Setup> {
    let label = path.display().to_string();
    let problem = OnnxProblem::from_file(path, loss)
        .map_err(anyhow::Error::msg)
        .with_context(|| label.clone())?;
    let inputs = problem.batch_inputs();
    let io = HvpIo::new(
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
pub(super) fn read_params(
    file: &Path,
    problem: &dyn Problem,
    label: &str,
) -> Result<Vec<HostTensor>> {
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
        out.push(HostTensor::from_graph(&t));
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
