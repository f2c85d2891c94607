//! Input and output names of the graphs that the compiler builds on the
//! fly for a problem (not stored in a bundle): a training step, an
//! evaluation and a Hessian-vector product. The compiler returns them with
//! the graphs; the runtime's drivers (`metatest`, `hessian`) run the graphs
//! by them.

use metac_graphs::Tensor;
use serde::{Deserialize, Serialize};

/// Names of the `train_step` graph's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainStepIo {
    /// Parameter inputs, in the problem's order.
    pub params: Vec<String>,
    /// Optimizer state inputs.
    pub state: Vec<String>,
    /// Optimizer weights (learned optimizers; empty for baselines).
    pub phi: Vec<String>,
    /// Minibatch inputs: for MNIST problems `[x, y]`; empty for data-free
    /// problems.
    pub batch: Vec<String>,
    /// Outputs holding the new parameters (same order as `params`).
    pub new_params: Vec<String>,
    /// Outputs holding the new state (same order as `state`).
    pub new_state: Vec<String>,
    /// The scalar loss at the parameters before the update.
    pub loss: String,
    /// Minibatch size `B` the graph was built for (0 for data-free problems).
    pub batch_size: usize,
}

/// Names of the `evaluate` graph's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalIo {
    /// Parameter inputs, in the problem's order (same names as the
    /// `train_step` parameters).
    pub params: Vec<String>,
    /// Evaluation batch inputs: `[x, y]` for MNIST problems; empty for
    /// data-free problems.
    pub batch: Vec<String>,
    /// Scalar mean loss over the batch.
    pub loss: String,
    /// Scalar fraction classified correctly (classifiers only).
    pub accuracy: Option<String>,
    /// Evaluation batch size `E` the graph was built for (0 for data-free
    /// problems).
    pub batch_size: usize,
}

/// Names of the HVP graph's inputs and outputs. For a parameter `P`: input
/// `P` (its value), input `v.P` (its part of the direction), outputs
/// `grad.P` and `hv.P`; plus the data inputs and the scalar output `loss`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvpIo {
    pub params: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    /// Data inputs (in the problem's order; empty for data-free problems).
    pub batch: Vec<String>,
    pub v: Vec<String>,
    pub loss: String,
    pub grad: Vec<String>,
    pub hv: Vec<String>,
}

impl HvpIo {
    /// The names for parameters `params` (name, shape) and data inputs `batch`.
    pub fn new(params: &[(String, Vec<usize>)], batch: Vec<String>) -> Self {
        let names = |pre: &str| params.iter().map(|(n, _)| format!("{pre}{n}")).collect();
        HvpIo {
            params: params.iter().map(|(n, _)| n.clone()).collect(),
            shapes: params.iter().map(|(_, s)| s.clone()).collect(),
            batch,
            v: names("v."),
            loss: "loss".into(),
            grad: names("grad."),
            hv: names("hv."),
        }
    }

    /// Total number of parameter elements.
    pub fn num_params(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

/// What one optimizer starts from.
#[derive(Clone, Debug)]
pub struct RunInit {
    /// Label of the optimizer in curves and summaries (e.g. `adam-1e-3`).
    pub optimizer: String,
    /// Initial parameters, in [`TrainStepIo::params`] order.
    pub params: Vec<Tensor>,
    /// Initial optimizer state, in [`TrainStepIo::state`] order.
    pub state: Vec<Tensor>,
    /// Optimizer weights, in [`TrainStepIo::phi`] order (empty for baselines).
    pub phi: Vec<Tensor>,
}
