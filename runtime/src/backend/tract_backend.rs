//! tract backend (tract-onnx 0.23.9): pure Rust, CPU only, always available.
//!
//! It is the fallback when ONNX Runtime is not installed and the reference for cross-checking ORT.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;

use super::{order_inputs, Backend, Device, InputSpec, Session};
use crate::tensor::{DType, HostTensor};

/// Loads graphs with tract. Single-threaded by design: tract's CPU kernels are not multi-threaded by
/// default, and keeping it that way makes tract runs reproducible and cheap to run in parallel processes.
pub struct TractBackend {
    _private: (),
}

impl TractBackend {
    /// Errors for any device but the CPU, so `--backend tract --device cuda:0` fails loudly instead of
    /// running on the CPU.
    pub fn new(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(TractBackend { _private: () }),
            Device::Cuda(_) => bail!(
                "{device} requested, but tract runs on CPU only; use --device cpu, or --backend ort with onnxruntime-gpu"
            ),
        }
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn load(&self, onnx: &[u8], label: &str) -> Result<Box<dyn Session>> {
        let proto = ModelProto::decode(onnx)
            .with_context(|| format!("graph '{label}': not a valid ONNX protobuf"))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| anyhow!("graph '{label}': the ONNX model has no graph"))?;
        // Names come from the protobuf, because tract names nodes (not tensors) and may rename or fuse
        // nodes while optimising; only the order of model inputs/outputs is guaranteed to survive.
        // Graph inputs that also have an initializer are constants in tract, not inputs.
        let initialized: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let input_names: Vec<String> = graph
            .input
            .iter()
            .filter(|i| !initialized.contains(i.name.as_str()))
            .map(|i| i.name.clone())
            .collect();
        let output_names: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

        // Input facts (types and static shapes) are taken from the model's own input declarations, which
        // is all tract needs since metac graphs are fully static.
        let model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .with_context(|| format!("graph '{label}': tract could not import the ONNX graph"))?;
        // Decluttered, not `into_optimized`: tract 0.23.9's codegen leaves a `Dummy` op behind in some
        // derivative graphs (two MatMuls sharing an operand in transposed roles, as HVPs produce) and
        // then fails at run time. The decluttered plan runs those graphs, and measured just as fast on
        // the MLP benchmark (3.8 vs 3.8 GFLOP/s on a 784x20 MatMul).
        let typed = model
            .into_typed()?
            .into_decluttered()
            .with_context(|| format!("graph '{label}': tract could not optimise the graph"))?;

        let n_in = typed.input_outlets()?.len();
        let n_out = typed.output_outlets()?.len();
        if n_in != input_names.len() || n_out != output_names.len() {
            bail!(
                "graph '{label}': tract sees {n_in} inputs / {n_out} outputs but the ONNX graph declares {} / {}",
                input_names.len(),
                output_names.len()
            );
        }
        let mut inputs = Vec::with_capacity(n_in);
        for (ix, name) in input_names.into_iter().enumerate() {
            let fact = typed.input_fact(ix)?;
            let dtype = to_dtype(fact.datum_type)
                .with_context(|| format!("graph '{label}': input '{name}'"))?;
            let shape = fact
                .shape
                .dims()
                .iter()
                .map(|d| d.to_usize().ok())
                .collect();
            inputs.push(InputSpec { name, dtype, shape });
        }
        for (ix, name) in output_names.iter().enumerate() {
            let dt = typed.output_fact(ix)?.datum_type;
            if dt != DatumType::TDim {
                to_dtype(dt).with_context(|| format!("graph '{label}': output '{name}'"))?;
            }
        }

        let plan = typed
            .into_runnable()
            .with_context(|| format!("graph '{label}': tract could not plan the graph"))?;
        // One state for the session's lifetime: tract resets its per-run values after each run, and reusing
        // the state avoids re-allocating the per-node tables every step.
        let state = plan.spawn()?;
        Ok(Box::new(TractSession {
            label: label.to_string(),
            state,
            inputs,
            outputs: output_names,
        }))
    }
}

fn to_dtype(dt: DatumType) -> Result<DType> {
    match dt {
        DatumType::F32 => Ok(DType::F32),
        DatumType::I64 => Ok(DType::I64),
        DatumType::Bool => Ok(DType::Bool),
        other => bail!("has element type {other:?}; metac only supports f32, i64 and bool"),
    }
}

struct TractSession {
    label: String,
    state: TypedSimpleState,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
}

impl Session for TractSession {
    fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|s| s.name.clone()).collect()
    }

    fn output_names(&self) -> Vec<String> {
        self.outputs.clone()
    }

    fn run(&mut self, inputs: &[(&str, &HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let ordered = order_inputs(&self.label, &self.inputs, inputs)?;
        // tract takes ownership of its inputs, so this is one copy per input.
        let values: TVec<TValue> = ordered
            .into_iter()
            .map(|t| match t {
                HostTensor::F32(a) => a.clone().into_tvalue(),
                HostTensor::I64(a) => a.clone().into_tvalue(),
                HostTensor::Bool(a) => a.clone().into_tvalue(),
            })
            .collect();
        let label = &self.label;
        let outs = self
            .state
            .run(values)
            .map_err(|e| anyhow!("graph '{label}': tract run failed: {e:#}"))?;
        if outs.len() != self.outputs.len() {
            bail!(
                "graph '{label}': tract returned {} outputs, expected {}",
                outs.len(),
                self.outputs.len()
            );
        }
        self.outputs
            .iter()
            .zip(outs)
            .map(|(name, v)| {
                Ok((
                    name.clone(),
                    from_tract(&v).with_context(|| format!("graph '{label}': output '{name}'"))?,
                ))
            })
            .collect()
    }
}

fn from_tract(v: &Tensor) -> Result<HostTensor> {
    Ok(match v.datum_type() {
        DatumType::F32 => HostTensor::F32(v.to_plain_array_view::<f32>()?.to_owned()),
        DatumType::I64 => HostTensor::I64(v.to_plain_array_view::<i64>()?.to_owned()),
        DatumType::Bool => HostTensor::Bool(v.to_plain_array_view::<bool>()?.to_owned()),
        // Shape computations may surface as symbolic dims; with static shapes they are plain integers.
        DatumType::TDim => {
            HostTensor::I64(v.cast_to::<i64>()?.to_plain_array_view::<i64>()?.to_owned())
        }
        other => bail!("unsupported element type {other:?}"),
    })
}
