//! Inference backends: ONNX Runtime (fast, optional, loaded at run time) and tract (pure Rust, built in
//! with the default cargo feature `tract`).
//!
//! metac compiles meta-learning programs to ONNX graphs ahead of time; at run time something has to execute
//! them. ONNX Runtime is much faster and can use CUDA, but it is a large native library that users install
//! separately (`pip install onnxruntime==1.31.1`), so metac loads it dynamically and falls back to tract
//! when it is missing. Both sit behind the object-safe [`Backend`]/[`Session`] traits so drivers don't care
//! which one they got.
//!
//! Sessions are built once per graph and then run many times (one call per inner/outer step), so the
//! traits are shaped to keep per-run work to input validation and value conversion.

mod discovery;
pub mod fused;
mod fused_kernel;
mod ort_backend;
#[cfg(feature = "tract")]
mod tract_backend;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Result};

pub use self::discovery::{
    find_library_in_dir, resolve_dylib_path, INSTALL_HINT, PINNED_ORT_VERSION,
};
pub use self::ort_backend::OrtBackend;
#[cfg(feature = "tract")]
pub use self::tract_backend::TractBackend;
use crate::tensor::{DType, HostTensor};

/// An inference engine able to turn ONNX bytes into runnable [`Session`]s.
///
/// `Send + Sync` (both engines allow it) so one backend can be shared by worker threads that each load
/// their own sessions.
pub trait Backend: Send + Sync {
    /// `"ort"` or `"tract"`: shown to users and recorded in run logs so timings can be attributed.
    fn name(&self) -> &'static str;
    /// Parses, optimises and prepares `onnx` for repeated execution. `label` names the graph in errors
    /// (a bundle holds several graphs, and "failed to load model" alone would not say which).
    fn load(&self, onnx: &[u8], label: &str) -> Result<Box<dyn Session>>;
}

/// A loaded graph, ready to run many times.
///
/// `Send` so a session can be moved to a worker thread; not `Sync`, because `run` mutates per-session
/// state (tract's execution state; ONNX Runtime's `Run` is not documented as safe to call concurrently).
pub trait Session: Send {
    /// Graph inputs (excluding initializers), in graph order.
    fn input_names(&self) -> Vec<String>;
    /// Graph outputs, in graph order.
    fn output_names(&self) -> Vec<String>;
    /// inputs by name (all graph inputs must be given, any order); returns all outputs in graph order, by name
    ///
    /// Inputs are checked (names, element types, static dimensions) before anything reaches the engine, so
    /// a mistake produces an error naming the graph and the input rather than an engine-internal message.
    fn run(&mut self, inputs: &[(&str, &HostTensor)]) -> Result<Vec<(String, HostTensor)>>;
}

/// Which engine the user asked for (`--backend auto|ort|tract`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// ONNX Runtime when it can be loaded, else tract (with one line on stderr saying so).
    #[default]
    Auto,
    /// ONNX Runtime or an error: for users who need its speed or CUDA and would rather fail than
    /// silently run 10x slower.
    Ort,
    /// tract only: deterministic, dependency-free, CPU.
    Tract,
}

impl FromStr for BackendChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "ort" | "onnxruntime" => Ok(BackendChoice::Ort),
            "tract" => Ok(BackendChoice::Tract),
            _ => bail!("unknown backend '{s}': expected one of auto, ort, tract"),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Ort => "ort",
            BackendChoice::Tract => "tract",
        })
    }
}

/// Where graphs execute (`--device cpu|cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device ordinal, as in `CUDA_VISIBLE_DEVICES` numbering.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(Device::Cpu);
        }
        if let Some(n) = t.strip_prefix("cuda:") {
            // Require an explicit ordinal: `cuda` alone is ambiguous on multi-GPU machines.
            return n.parse::<usize>().map(Device::Cuda).map_err(|_| {
                anyhow::anyhow!("invalid device '{s}': the CUDA device ordinal must be a non-negative integer, as in cuda:0")
            });
        }
        bail!("invalid device '{s}': expected cpu or cuda:N (e.g. cuda:0)")
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Everything needed to pick and configure a backend.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    pub choice: BackendChoice,
    pub device: Device,
    /// ONNX Runtime intra-op threads; `None` = `std::thread::available_parallelism()`. Ignored by tract,
    /// which runs single-threaded.
    pub threads: Option<usize>,
    /// Run every op as ONNX Runtime's own kernel instead of fusing
    /// elementwise chains into metac's kernel (the default on CPU).
    pub unfused: bool,
}

/// Opens the backend described by `opts`. See [`BackendChoice`] for the fallback rules.
///
/// ONNX Runtime is located and initialised at most once per process (see `discovery`); later calls reuse it,
/// so this is cheap to call per graph or per bundle.
pub fn open_backend(opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match opts.choice {
        BackendChoice::Tract => tract(opts.device),
        BackendChoice::Ort => {
            let rt = discovery::ort_runtime().map_err(|e| {
                anyhow!("backend 'ort' was requested, but ONNX Runtime is not available: {}. {INSTALL_HINT}", one_line(&format!("{e:#}")))
            })?;
            Ok(Box::new(OrtBackend::new(
                rt,
                opts.device,
                opts.threads,
                !opts.unfused,
            )?))
        }
        BackendChoice::Auto => match discovery::ort_runtime() {
            Ok(rt) => Ok(Box::new(OrtBackend::new(
                rt,
                opts.device,
                opts.threads,
                !opts.unfused,
            )?)),
            Err(e) => {
                if let Device::Cuda(_) = opts.device {
                    // tract cannot use a GPU, so falling back would only turn this into a less helpful error.
                    bail!(
                        "device {} needs ONNX Runtime with CUDA support, which is not available ({}). Install with: pip install onnxruntime-gpu==1.31.1, or set ORT_DYLIB_PATH",
                        opts.device,
                        one_line(&format!("{e:#}"))
                    );
                }
                if !cfg!(feature = "tract") {
                    bail!(
                        "ONNX Runtime is not available ({}), and this metac was built without the tract backend (cargo feature `tract`). {INSTALL_HINT}",
                        one_line(&format!("{e:#}"))
                    );
                }
                print_fallback_notice(&e);
                tract(opts.device)
            }
        },
    }
}

#[cfg(feature = "tract")]
fn tract(device: Device) -> Result<Box<dyn Backend>> {
    Ok(Box::new(TractBackend::new(device)?))
}

#[cfg(not(feature = "tract"))]
fn tract(_device: Device) -> Result<Box<dyn Backend>> {
    bail!("backend 'tract' was requested, but this metac was built without it (cargo feature `tract`, on by default: rebuild without --no-default-features)")
}

/// Tells the user once per process that they are on the slow path and how to get off it. Once, because
/// drivers open a backend per bundle and repeating the same line would bury real output.
fn print_fallback_notice(e: &anyhow::Error) {
    static PRINTED: AtomicBool = AtomicBool::new(false);
    if !PRINTED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "metac: ONNX Runtime not available ({}); falling back to tract. {INSTALL_HINT}",
            one_line(&format!("{e:#}"))
        );
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What a graph expects for one input: used to check user inputs identically for every backend.
#[derive(Debug, Clone)]
pub(crate) struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// `None` for a dimension the model leaves symbolic.
    pub shape: Vec<Option<usize>>,
}

/// Matches named `inputs` against `specs` and returns them in spec (graph) order.
///
/// Doing this ourselves (instead of letting the engine complain) gives the same, specific error for both
/// backends: tract in particular reports a mismatch as a shape-inference failure deep in the graph.
pub(crate) fn order_inputs<'a>(
    label: &str,
    specs: &[InputSpec],
    inputs: &[(&str, &'a HostTensor)],
) -> Result<Vec<&'a HostTensor>> {
    let mut by_name: HashMap<&str, &'a HostTensor> = HashMap::with_capacity(inputs.len());
    for (name, t) in inputs {
        if by_name.insert(name, t).is_some() {
            bail!("graph '{label}': input '{name}' was given more than once");
        }
    }
    let mut ordered = Vec::with_capacity(specs.len());
    let mut missing = Vec::new();
    for spec in specs {
        match by_name.remove(spec.name.as_str()) {
            Some(t) => {
                check_input(label, spec, t)?;
                ordered.push(t);
            }
            None => missing.push(spec.name.as_str()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "graph '{label}': missing input(s) {}; the graph expects [{}]",
            quote_list(missing.iter().copied()),
            quote_list(specs.iter().map(|s| s.name.as_str()))
        );
    }
    if !by_name.is_empty() {
        let mut extra: Vec<&str> = by_name.keys().copied().collect();
        extra.sort_unstable();
        bail!(
            "graph '{label}': unknown input(s) {}; the graph expects [{}]",
            quote_list(extra.into_iter()),
            quote_list(specs.iter().map(|s| s.name.as_str()))
        );
    }
    Ok(ordered)
}

fn check_input(label: &str, spec: &InputSpec, t: &HostTensor) -> Result<()> {
    let shape_ok = t.shape().len() == spec.shape.len()
        && t.shape()
            .iter()
            .zip(&spec.shape)
            .all(|(&got, want)| want.is_none_or(|w| w == got));
    if t.dtype() != spec.dtype || !shape_ok {
        bail!(
            "graph '{label}': input '{}' expects {} tensor of shape {}, got {}",
            spec.name,
            spec.dtype,
            fmt_spec_shape(&spec.shape),
            t.describe()
        );
    }
    Ok(())
}

fn fmt_spec_shape(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

fn quote_list<'s>(names: impl Iterator<Item = &'s str>) -> String {
    names
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

// The tests use tract as the reference backend.
#[cfg(all(test, feature = "tract"))]
mod tests;
