//! Graphs for meta-testing an optimizer on a problem: one training step and
//! an evaluation of the parameters. The runtime driver
//! (`metac_runtime::metatest`) runs them; the name lists it needs come back
//! with the graphs as [`TrainStepIo`] / [`EvalIo`].
//!
//! `train_step` (inputs in this order):
//! * the problem's parameters, under their own names (`w0`, `b0`, ...);
//! * the optimizer state, under the optimizer's state names (`adam.p0.m`,
//!   ..., `hrnn.state.h0`, ...);
//! * for the HierarchicalRNN, its weights `phi` under their names
//!   (`hrnn.l0.gates.w`, ...), so that one graph serves any trained weights;
//! * the minibatch inputs (`x`, `y` for MNIST problems; none for data-free
//!   problems, whose data is baked into the loss).
//!
//! Outputs: `new.{param}` for every parameter, `new.{state}` for every state
//! tensor, then `loss`: the (minibatch) loss at the parameters *before* the
//! update (the loss whose gradient the step uses).
//!
//! `evaluate`: inputs = the parameters and the batch inputs of the problem
//! built with the evaluation batch size (none for data-free problems);
//! outputs `loss` and, for classifiers, `accuracy`.

use metac_contract::io::{EvalIo, RunInit, TrainStepIo};
use metac_graphs::autodiff::grad;
use metac_graphs::passes::optimize;
use metac_graphs::{Graph, Tensor};

use crate::models::baselines::{Baseline, StepOptimizer};
use crate::models::hrnn::Hrnn;
use crate::models::problems::Problem;

/// The optimizer a meta-test runs.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaOptimizer {
    /// A hand-designed baseline (hyperparameters baked into the graph).
    Baseline(Baseline),
    /// The learned HierarchicalRNN; its weights are graph inputs.
    Hrnn(Hrnn),
}

impl MetaOptimizer {
    /// Short name of the optimizer family (`adam`, `sgd`, ..., `hrnn`).
    pub fn family(&self) -> &'static str {
        match self {
            MetaOptimizer::Baseline(b) => b.name(),
            MetaOptimizer::Hrnn(_) => "hrnn",
        }
    }

    /// Names and shapes of the state for the given parameter shapes.
    pub fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        match self {
            MetaOptimizer::Baseline(b) => b.state_specs(param_shapes),
            MetaOptimizer::Hrnn(h) => h.state_specs(param_shapes),
        }
    }

    /// Names and shapes of the optimizer weights (empty for baselines).
    pub fn phi_specs(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            MetaOptimizer::Baseline(_) => vec![],
            MetaOptimizer::Hrnn(h) => h.weights().shapes(),
        }
    }

    /// Initial state values in `state_specs` order. For the HRNN the hidden
    /// states come from `phi`'s `hrnn.init.l*` (as the original's reset)
    /// and the per-element learning rates from `seed`; baselines ignore both.
    ///
    /// # Panics
    /// For the HRNN when `phi` lacks the init vectors.
    pub fn initial_state(
        &self,
        param_shapes: &[Vec<usize>],
        phi: &[(String, Tensor)],
        seed: u64,
    ) -> Vec<(String, Tensor)> {
        match self {
            MetaOptimizer::Baseline(b) => b.initial_state(param_shapes),
            MetaOptimizer::Hrnn(h) => h.initial_state_with_weights(param_shapes, phi, seed),
        }
    }
}

/// A built (not yet optimised) graph with the names the runtime needs.
#[derive(Clone, Debug)]
pub struct TrainStepGraph {
    pub graph: Graph,
    pub io: TrainStepIo,
}

/// The evaluation graph and its names.
#[derive(Clone, Debug)]
pub struct EvalGraph {
    pub graph: Graph,
    pub io: EvalIo,
}

fn batch_size_of(problem: &dyn Problem) -> usize {
    problem
        .batch_inputs()
        .first()
        .and_then(|(_, _, s)| s.first().copied())
        .unwrap_or(0)
}

/// Builds `train_step` for `problem` and `opt` (see the module docs).
pub fn build_train_step(problem: &dyn Problem, opt: &MetaOptimizer) -> TrainStepGraph {
    let mut g = Graph::new();
    let shapes: Vec<Vec<usize>> = problem.param_shapes().into_iter().map(|(_, s)| s).collect();
    let param_names: Vec<String> = problem.param_shapes().into_iter().map(|(n, _)| n).collect();
    let params: Vec<_> = problem
        .param_shapes()
        .iter()
        .map(|(n, s)| g.input(n, metac_graphs::DType::F32, s))
        .collect();
    let state_specs = opt.state_specs(&shapes);
    let state: Vec<_> = state_specs
        .iter()
        .map(|(n, s)| g.input(n, metac_graphs::DType::F32, s))
        .collect();
    let phi_specs = opt.phi_specs();
    let phi: Vec<_> = phi_specs
        .iter()
        .map(|(n, s)| g.input(n, metac_graphs::DType::F32, s))
        .collect();
    let batch_specs = problem.batch_inputs();
    let batch: Vec<_> = batch_specs
        .iter()
        .map(|(n, d, s)| g.input(n, *d, s))
        .collect();
    let loss = problem.loss(&mut g, &params, &batch);
    let grads = grad(&mut g, loss, &params);
    let (new_p, new_s) = match opt {
        MetaOptimizer::Baseline(b) => b.step(&mut g, &params, &grads, &state),
        MetaOptimizer::Hrnn(h) => h.step(&mut g, &phi, &params, &grads, &state, loss),
    };
    let new_params: Vec<String> = param_names.iter().map(|n| format!("new.{n}")).collect();
    let new_state: Vec<String> = state_specs
        .iter()
        .map(|(n, _)| format!("new.{n}"))
        .collect();
    for (n, &id) in new_params.iter().zip(&new_p) {
        g.output(n, id);
    }
    for (n, &id) in new_state.iter().zip(&new_s) {
        g.output(n, id);
    }
    g.output("loss", loss);
    TrainStepGraph {
        graph: g,
        io: TrainStepIo {
            params: param_names,
            state: state_specs.into_iter().map(|(n, _)| n).collect(),
            phi: phi_specs.into_iter().map(|(n, _)| n).collect(),
            batch: batch_specs.into_iter().map(|(n, _, _)| n).collect(),
            new_params,
            new_state,
            loss: "loss".into(),
            batch_size: batch_size_of(problem),
        },
    }
}

/// Where optimizer `label` starts for `seed`: the problem's initial
/// parameters and the optimizer's initial state (from `phi` for the HRNN).
pub fn run_init(
    label: &str,
    problem: &dyn Problem,
    opt: &MetaOptimizer,
    phi: &[(String, Tensor)],
    seed: u64,
) -> RunInit {
    let shapes: Vec<Vec<usize>> = problem.param_shapes().into_iter().map(|(_, s)| s).collect();
    RunInit {
        optimizer: label.into(),
        params: problem.init_params(seed),
        state: opt
            .initial_state(&shapes, phi, seed)
            .into_iter()
            .map(|(_, t)| t)
            .collect(),
        phi: phi.iter().map(|(_, t)| t.clone()).collect(),
    }
}

/// Builds `evaluate` for `problem` (for MNIST problems, build the problem
/// with the evaluation batch size, e.g. `problem_by_name("mnist-mlp",
/// 1000)`). `accuracy` is an output only for classifiers.
pub fn build_evaluate(problem: &dyn Problem) -> EvalGraph {
    let g = problem.loss_graph();
    let accuracy = g.find_output("accuracy").map(|_| "accuracy".to_string());
    EvalGraph {
        graph: g,
        io: EvalIo {
            params: problem.param_shapes().into_iter().map(|(n, _)| n).collect(),
            batch: problem
                .batch_inputs()
                .into_iter()
                .map(|(n, _, _)| n)
                .collect(),
            loss: "loss".into(),
            accuracy,
            batch_size: batch_size_of(problem),
        },
    }
}

/// Optimises `g` and serialises it as ONNX (ready for `Backend::load`).
pub fn to_onnx(g: &Graph, name: &str) -> Result<Vec<u8>, String> {
    let g = optimize(g);
    metac_graphs::onnx::export_bytes(&g, name).map_err(|e| e.to_string())
}
