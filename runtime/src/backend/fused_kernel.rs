//! The ONNX Runtime kernel of `ai.metac` `FusedElementwise` nodes: runs a
//! [`FusedProgram`] (see `metac_graphs::fusion`) over ONNX Runtime's
//! intra-op thread pool.

use super::fused::{Execute, Walk, CHUNK};
use metac_graphs::fusion::{FusedProgram, FUSED_DOMAIN, FUSED_OP};
use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

/// Output elements per task handed to the thread pool: below this a
/// kernel runs on the calling thread (a hand-off costs more than the work).
const ELEMENTS_PER_TASK: usize = 4 * 1024;

thread_local! {
    /// Each thread's registers, kept between runs: a fresh buffer per task
    /// would cost its page faults again every time (a column-stacked
    /// program has a hundred registers or more).
    static REGISTERS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's register buffer of at least `len` floats.
fn with_registers(len: usize, f: impl FnOnce(&mut [f32])) {
    REGISTERS.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() < len {
            r.resize(len, 0.0);
        }
        f(&mut r[..len]);
    });
}

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
        let partials = vec![0.0; program.partials_len(&walk)];
        Ok(FusedKernel {
            program,
            walk,
            partials,
        })
    }
}

struct FusedKernel {
    program: FusedProgram,
    walk: Walk,
    /// Each unit's share of the contractions, added up after a run (kept
    /// between runs; every unit writes its whole block).
    partials: Vec<f32>,
}

/// Output base pointers and the contraction partials, shared by the pool's
/// tasks, which write disjoint ranges.
struct Targets {
    outputs: Vec<*mut f32>,
    partials: *mut f32,
}
// SAFETY: the pointers address buffers that outlive the parallel loop, and
// tasks write disjoint units of them.
unsafe impl Sync for Targets {}
unsafe impl Send for Targets {}

impl Targets {
    /// Through a method, so closures capture the whole `Targets` (which is
    /// `Sync`), not its fields.
    fn get(&self) -> (&[*mut f32], *mut f32) {
        (&self.outputs, self.partials)
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
        let mut outs = (0..p.output_count())
            .map(|k| {
                let shape: Vec<i64> = p.output_shape(k).iter().map(|&d| d as i64).collect();
                ctx.output(k, shape)?
                    .ok_or_else(|| ort::Error::new(format!("FusedElementwise: no output {k}")))
            })
            .collect::<ort::Result<Vec<_>>>()?;
        let mut ptrs = Vec::with_capacity(outs.len());
        for o in outs.iter_mut() {
            let (_, data) = o.try_extract_tensor_mut::<f32>()?;
            ptrs.push(data.as_mut_ptr());
        }
        let targets = Targets {
            outputs: ptrs,
            partials: self.partials.as_mut_ptr(),
        };
        let units = self.walk.units();
        // A unit of a column-stacked program is a chunk of every row: work
        // enough for a task of its own.
        let per_task = match p.columns {
            Some(_) => 1,
            None => (ELEMENTS_PER_TASK / CHUNK).max(1),
        };
        let tasks = units.div_ceil(per_task);
        let run = |task: usize| {
            let range = task * per_task..((task + 1) * per_task).min(units);
            with_registers(p.register_len(), |regs| {
                // SAFETY: inputs have the program's shapes (checked above),
                // every output has its shape, and tasks cover disjoint units.
                let (outputs, partials) = targets.get();
                unsafe { p.run_units(&self.walk, &inputs, outputs, range, regs, partials) };
            });
        };
        if tasks <= 1 {
            run(0);
        } else {
            ctx.par_for(tasks, tasks, run)?;
        }
        // SAFETY: every unit ran; the outputs have the program's shapes.
        unsafe { p.finish_sums(&self.walk, &self.partials, &targets.outputs) };
        Ok(())
    }
}

/// The `ai.metac` operator domain, for sessions that load fused graphs (one
/// per session: the domain is neither `Send` nor `Sync`).
pub fn fused_domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(FUSED_DOMAIN)?.add(FusedElementwise)
}
