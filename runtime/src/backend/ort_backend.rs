//! ONNX Runtime backend (via the `ort` crate, 2.0.0-rc.15, library loaded at run time).

use std::borrow::Cow;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::ArrayD;
use ort::ep::{ExecutionProvider, CUDA};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session as OrtSession, SessionInputValue};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef, ValueType};

use metac_graphs::fusion::fuse_onnx;

use super::discovery::{global_pool_threads, OrtRuntime};
use super::fused_kernel::fused_domain;
use super::{order_inputs, Backend, Device, InputSpec, Session};
use crate::tensor::{DType, HostTensor};

/// Creates ONNX Runtime sessions in the process-wide environment.
pub struct OrtBackend {
    rt: &'static OrtRuntime,
    device: Device,
    intra_threads: usize,
    /// Graphs are loaded with their elementwise chains fused into metac's
    /// kernel (CPU only).
    fuse: bool,
}

impl OrtBackend {
    /// Fails up front for `cuda:N` when the loaded library has no CUDA provider, so the user learns that
    /// before any graph is compiled rather than at the first `load`.
    pub(crate) fn new(
        rt: &'static OrtRuntime,
        device: Device,
        threads: Option<usize>,
        fuse: bool,
    ) -> Result<Self> {
        if let Device::Cuda(_) = device {
            check_cuda_compiled_in(rt)?;
        }
        // An explicit count rather than ORT's default (physical cores of the machine): the standard
        // library's figure honours CPU affinity and cgroup quotas, so containers and `taskset` runs are
        // not oversubscribed.
        let intra_threads = threads
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // The kernel is a CPU kernel: on a GPU it would move every fused
        // chain's data to the host and back.
        Ok(OrtBackend {
            rt,
            device,
            intra_threads,
            fuse: fuse && device == Device::Cpu,
        })
    }

    /// Path of the loaded ONNX Runtime library, for run logs.
    pub fn library_path(&self) -> &std::path::Path {
        &self.rt.dylib
    }

    /// Version of the loaded ONNX Runtime library (e.g. `1.31.1`), for run logs.
    pub fn library_version(&self) -> &str {
        &self.rt.version
    }

    pub fn intra_threads(&self) -> usize {
        self.intra_threads
    }

    /// Whether graphs are loaded with their elementwise chains fused.
    pub fn fuses(&self) -> bool {
        self.fuse
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn load(&self, onnx: &[u8], label: &str) -> Result<Box<dyn Session>> {
        let mut builder = OrtSession::builder(&self.rt.env)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(ort::Error::<()>::from)?;
        // The environment's shared pool has `global_pool_threads()`; another
        // count needs a pool of the session's own.
        if self.intra_threads != global_pool_threads() {
            builder = builder
                .with_independent_thread_pool()
                .map_err(ort::Error::<()>::from)?
                .with_intra_threads(self.intra_threads)
                .map_err(ort::Error::<()>::from)?;
        }
        if let Device::Cuda(id) = self.device {
            builder = register_cuda(builder, id)?;
        }
        // METAC_ORT_PROFILE=DIR writes ONNX Runtime's per-node profile of
        // every session (JSON, one file per graph) when the session ends.
        let profile_dir = std::env::var_os("METAC_ORT_PROFILE");
        if let Some(dir) = &profile_dir {
            builder = builder
                .with_profiling(std::path::Path::new(&dir).join(label))
                .map_err(ort::Error::<()>::from)?;
        }
        // A graph the importer cannot read runs as it is (fusion is only an
        // optimisation), and says so: it will be slower than a fused one.
        let fused = match self.fuse {
            true => fuse_onnx(onnx, label).unwrap_or_else(|e| {
                eprintln!("metac: note: graph '{label}' runs op by op, without fused kernels: {e}");
                None
            }),
            false => None,
        };
        if fused.is_some() {
            let domain =
                fused_domain().map_err(|e| anyhow!("registering metac's fused kernel: {e}"))?;
            builder = builder
                .with_operators(domain)
                .map_err(ort::Error::<()>::from)?;
        }
        let session = builder.commit_from_memory(fused.as_deref().unwrap_or(onnx)).map_err(|e| match self.device {
            // With CUDA registered, a failure here is most often the GPU itself (no device, driver or
            // cuDNN mismatch), which ORT reports only at session creation.
            Device::Cuda(id) => anyhow!(
                "graph '{label}': ONNX Runtime could not create the session on cuda:{id} (CUDA execution provider unavailable or the graph failed to load): {e}"
            ),
            Device::Cpu => anyhow!("graph '{label}': ONNX Runtime could not load the graph: {e}"),
        })?;

        let inputs = session
            .inputs()
            .iter()
            .map(|o| {
                let (dtype, shape) = tensor_info(o.dtype())
                    .with_context(|| format!("graph '{label}': input '{}'", o.name()))?;
                Ok(InputSpec {
                    name: o.name().to_string(),
                    dtype,
                    shape,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| {
                tensor_info(o.dtype())
                    .with_context(|| format!("graph '{label}': output '{}'", o.name()))?;
                Ok(o.name().to_string())
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(Box::new(OrtBackendSession {
            label: label.to_string(),
            profiling: profile_dir.is_some(),
            session,
            inputs,
            outputs,
        }))
    }
}

/// Adds the CUDA execution provider so that failure is an error, never a silent CPU run.
///
/// ort's default for an execution provider that fails to register is to log and carry on with the CPU
/// provider; for a user who asked for `cuda:N` that would silently turn a GPU run into a CPU one.
pub(super) fn register_cuda(
    builder: ort::session::builder::SessionBuilder,
    id: usize,
) -> Result<ort::session::builder::SessionBuilder> {
    let device_id =
        i32::try_from(id).map_err(|_| anyhow!("CUDA device ordinal {id} is out of range"))?;
    let ep = CUDA::default()
        .with_device_id(device_id)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([ep])
        .map_err(|e| anyhow!("CUDA execution provider unavailable: {e}"))
}

/// The CPU-only `onnxruntime` wheel simply lacks the CUDA provider; saying so (and naming the GPU wheel)
/// is far more useful than the provider-bridge error ORT would give at registration.
fn check_cuda_compiled_in(rt: &OrtRuntime) -> Result<()> {
    match CUDA::is_available() {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "CUDA execution provider unavailable: the loaded ONNX Runtime {} ({}) was built without CUDA support (the `onnxruntime` wheel is CPU-only). Install with: pip install onnxruntime-gpu==1.31.1, or use --device cpu",
            rt.version,
            rt.dylib.display()
        ),
        Err(e) => bail!("CUDA execution provider unavailable: could not query ONNX Runtime's providers: {e}"),
    }
}

/// Element type and static dimensions of a tensor-typed graph value; errors for types metac does not use.
impl Drop for OrtBackendSession {
    fn drop(&mut self) {
        if self.profiling {
            // Writes the profile; a failure only loses the profile.
            let _ = self.session.end_profiling();
        }
    }
}

fn tensor_info(t: &ValueType) -> Result<(DType, Vec<Option<usize>>)> {
    let ValueType::Tensor { ty, shape, .. } = t else {
        bail!("has type {t:?}; metac only supports tensors");
    };
    let dtype = match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Bool => DType::Bool,
        other => bail!("has element type {other}; metac only supports f32, i64 and bool"),
    };
    let dims = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    Ok((dtype, dims))
}

struct OrtBackendSession {
    label: String,
    profiling: bool,
    session: OrtSession,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
}

impl Session for OrtBackendSession {
    fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|s| s.name.clone()).collect()
    }

    fn output_names(&self) -> Vec<String> {
        self.outputs.clone()
    }

    fn run(&mut self, inputs: &[(&str, &HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let ordered = order_inputs(&self.label, &self.inputs, inputs)?;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(ordered.len());
        for (spec, t) in self.inputs.iter().zip(ordered) {
            let v = to_ort(t).with_context(|| {
                format!("graph '{}': converting input '{}'", self.label, spec.name)
            })?;
            values.push((Cow::Borrowed(spec.name.as_str()), v));
        }

        let label = &self.label;
        let outputs = self
            .session
            .run(values)
            .map_err(|e| anyhow!("graph '{label}': ONNX Runtime run failed: {e}"))?;
        let mut result = Vec::with_capacity(outputs.len());
        // `SessionOutputs` iterates in the session's output order, which is the graph's output order.
        for (name, value) in outputs.iter() {
            let t = match value.dtype().tensor_type() {
                Some(TensorElementType::Float32) => HostTensor::F32(extract::<f32>(&value)?),
                Some(TensorElementType::Int64) => HostTensor::I64(extract::<i64>(&value)?),
                Some(TensorElementType::Bool) => HostTensor::Bool(extract::<bool>(&value)?),
                other => bail!("graph '{label}': output '{name}' has unsupported type {other:?}"),
            };
            result.push((name.to_string(), t));
        }
        Ok(result)
    }
}

/// Borrows the array's memory when it is already contiguous (the common case, no copy); copies otherwise,
/// since ONNX Runtime only accepts dense row-major buffers.
fn to_ort(t: &HostTensor) -> Result<SessionInputValue<'_>> {
    fn conv<T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        a: &ArrayD<T>,
    ) -> Result<SessionInputValue<'_>> {
        if a.is_standard_layout() {
            Ok(TensorRef::from_array_view(a.view())?.into())
        } else {
            Ok(Tensor::from_array(a.as_standard_layout().into_owned())?.into())
        }
    }
    match t {
        HostTensor::F32(a) => conv(a),
        HostTensor::I64(a) => conv(a),
        HostTensor::Bool(a) => conv(a),
    }
}

fn extract<T: PrimitiveTensorElementType + Clone>(v: &ort::value::DynValue) -> Result<ArrayD<T>> {
    Ok(v.try_extract_array::<T>()?.to_owned())
}
