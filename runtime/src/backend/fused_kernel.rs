//! The ONNX Runtime kernel of `ai.metac` `FusedElementwise` nodes: runs a
//! [`FusedProgram`] (see `metac_graphs::fusion`) over ONNX Runtime's
//! intra-op thread pool.

use metac_graphs::fusion::program::{Walk, CHUNK};
use metac_graphs::fusion::{FusedProgram, FUSED_DOMAIN, FUSED_OP};
use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

/// Output elements per task handed to the thread pool: below this a
/// kernel runs on the calling thread (a hand-off costs more than the work).
const ELEMENTS_PER_TASK: usize = 4 * 1024;

struct FusedElementwise;

impl Operator for FusedElementwise {
    type Kernel<'attr> = FusedKernel;

    fn name(&self) -> &str {
        FUSED_OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::variadic(1).homogenous(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::variadic(1).homogenous(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<FusedKernel> {
        let text: String = kctx
            .get("program")
            .ok_or_else(|| ort::Error::new("FusedElementwise: no 'program' attribute"))?;
        let program = FusedProgram::decode(&text).map_err(|e| ort::Error::new(e.to_string()))?;
        let walk = program.walk();
        Ok(FusedKernel { program, walk })
    }
}

struct FusedKernel {
    program: FusedProgram,
    walk: Walk,
}

/// Output base pointers shared by the pool's tasks, which write disjoint
/// ranges.
struct Outputs(Vec<*mut f32>);
// SAFETY: the pointers address buffers that outlive the parallel loop, and
// tasks write disjoint units of them.
unsafe impl Sync for Outputs {}
unsafe impl Send for Outputs {}

impl Outputs {
    /// Through a method, so closures capture the whole `Outputs` (which is
    /// `Sync`), not its field.
    fn get(&self) -> &[*mut f32] {
        &self.0
    }
}

impl Kernel for FusedKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let p = &self.program;
        let n_in = ctx.num_inputs()?;
        if n_in != p.inputs.len() {
            return Err(ort::Error::new(format!(
                "FusedElementwise: {n_in} inputs for a program of {}",
                p.inputs.len()
            )));
        }
        let values = (0..n_in)
            .map(|i| {
                ctx.input(i)?
                    .ok_or_else(|| ort::Error::new(format!("FusedElementwise: no input {i}")))
            })
            .collect::<ort::Result<Vec<_>>>()?;
        let mut inputs: Vec<&[f32]> = Vec::with_capacity(n_in);
        for (i, v) in values.iter().enumerate() {
            let (shape, data) = v.try_extract_tensor::<f32>()?;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if dims != p.inputs[i] {
                return Err(ort::Error::new(format!(
                    "FusedElementwise: input {i} has shape {dims:?}, the program reads {:?}",
                    p.inputs[i]
                )));
            }
            inputs.push(data);
        }
        let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
        let mut outs = (0..p.outputs.len())
            .map(|k| {
                ctx.output(k, shape.clone())?
                    .ok_or_else(|| ort::Error::new(format!("FusedElementwise: no output {k}")))
            })
            .collect::<ort::Result<Vec<_>>>()?;
        let mut ptrs = Vec::with_capacity(outs.len());
        for o in outs.iter_mut() {
            let (_, data) = o.try_extract_tensor_mut::<f32>()?;
            ptrs.push(data.as_mut_ptr());
        }
        let ptrs = Outputs(ptrs);
        let units = self.walk.units();
        let per_task = (ELEMENTS_PER_TASK / CHUNK).max(1);
        let tasks = units.div_ceil(per_task);
        let run = |task: usize| {
            let range = task * per_task..((task + 1) * per_task).min(units);
            let mut regs = vec![0.0f32; p.registers * CHUNK];
            // SAFETY: inputs have the program's shapes (checked above), every
            // output holds `p.len()` floats, and tasks cover disjoint units.
            unsafe { p.run_units(&self.walk, &inputs, ptrs.get(), range, &mut regs) };
        };
        if tasks <= 1 {
            run(0);
        } else {
            ctx.par_for(tasks, tasks, run)?;
        }
        Ok(())
    }
}

/// The `ai.metac` operator domain, for sessions that load fused graphs (one
/// per session: the domain is neither `Send` nor `Sync`).
pub fn fused_domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(FUSED_DOMAIN)?.add(FusedElementwise)
}
