//! The Hessian-vector-product graph of a problem (`metac hessian`).
//!
//! One graph per data-chunk size: inputs the parameters (under their own
//! names), the problem's batch inputs and a direction `v.<param>` per
//! parameter; outputs `loss`, `grad.<param>` and `hv.<param>` (the HVP by
//! forward-over-reverse). The names are [`HvpIo`]'s; the runtime
//! (`metac_runtime::hessian`) runs the Lanczos, SLQ and Hutchinson loops
//! over it.

use metac_contract::io::HvpIo;
use metac_graphs::{autodiff, DType, Graph};

use crate::models::problems::Problem;

/// The HVP graph and its input/output names.
pub struct HvpGraph {
    pub graph: Graph,
    pub io: HvpIo,
}

/// Builds the HVP graph of `problem` (for its batch size).
pub fn build_hvp(problem: &dyn Problem) -> HvpGraph {
    let shapes = problem.param_shapes();
    let batch = problem
        .batch_inputs()
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    let io = HvpIo::new(&shapes, batch);
    let mut g = Graph::new();
    let (p, b) = problem.declare_inputs(&mut g);
    let v: Vec<_> =
        io.v.iter()
            .zip(&shapes)
            .map(|(n, (_, s))| g.input(n, DType::F32, s))
            .collect();
    let loss = problem.loss(&mut g, &p, &b);
    let grads = autodiff::grad(&mut g, loss, &p);
    let hv = autodiff::hvp_forward_over_reverse(&mut g, loss, &p, &v);
    g.output(&io.loss, loss);
    for (n, &id) in io.grad.iter().zip(&grads) {
        g.output(n, id);
    }
    for (n, &id) in io.hv.iter().zip(&hv) {
        g.output(n, id);
    }
    HvpGraph { graph: g, io }
}
