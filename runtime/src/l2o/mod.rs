//! Learned-optimizer (L2O) meta-training on the host: the names an L2O
//! bundle uses ([`L2oLayout`]) and truncated BPTT from the compiled step and
//! step-VJP graphs ([`bptt`]), the host meta-optimizer ([`meta_opt`]) and
//! one meta-iteration of unrolls ([`train`]) with MNIST batches ([`data`]).
//!
//! The compiler (`metac_compiler::l2o`) writes the layout into the bundle's
//! `meta.l2o.layout`; nothing here derives a name by convention except the
//! three prefixes below, which both sides share through this module.

pub mod bptt;
pub mod curriculum;
pub mod data;
pub mod imitation;
pub mod meta_opt;
pub mod regularizer;
pub mod run;
pub mod train;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use bptt::Named;
pub use bptt::{
    meta_loss_term, truncated_bptt, BpttResult, GraphRunner, SessionRunner, StepRunner, StepTensor,
    Unroll,
};
pub use data::MnistUnrollData;
pub use meta_opt::{CompiledMetaUpdate, MetaUpdate, RmsProp, RmsPropConfig};
pub use train::{meta_iteration, MetaIterationReport, UnrollData, UnrollSchedule};

/// Prefix of a step output that replaces an input (`next.theta.w0`).
pub const NEXT: &str = "next.";
/// Prefix of a cotangent input of a VJP graph (`ct.next.theta.w0`).
pub const CT: &str = "ct.";
/// Prefix of a VJP graph's output, the cotangent of an input (`d.hrnn.update.w`).
pub const D: &str = "d.";
/// Name of the step's objective output (and, with [`CT`], of its cotangent).
pub const OBJECTIVE: &str = "objective";
/// The graph measuring the objective at several inner steps at once.
pub const OBJECTIVE_CHUNK: &str = "objective_chunk";
/// `step` without the regulariser (bundles with one also carry it, and its
/// VJP): validation runs it, and an unroll whose regulariser weight is 0
/// runs the VJP, skipping third-order terms it would not count.
pub const STEP_UNREGULARIZED: &str = "step_unregularized";
/// `step_vjp` without the regulariser; see [`STEP_UNREGULARIZED`].
pub const STEP_VJP_UNREGULARIZED: &str = "step_vjp_unregularized";
/// `t<k>.<name>`: the `k`-th parameter set of an `objective_chunk` graph and
/// its outputs.
pub fn chunk_name(k: usize, name: &str) -> String {
    format!("t{k}.{name}")
}
/// Name of the step's minibatch-loss output.
pub const MINIBATCH_LOSS: &str = "minibatch_loss";
/// Prefix of the step's outputs holding the gradient of the objective in the
/// new parameters (`objective_grad.theta.w0`).
pub const OBJECTIVE_GRAD: &str = "objective_grad.";

/// `next.<name>`.
pub fn next_name(name: &str) -> String {
    format!("{NEXT}{name}")
}
/// `ct.<name>`.
pub fn ct_name(name: &str) -> String {
    format!("{CT}{name}")
}
/// `d.<name>`.
pub fn d_name(name: &str) -> String {
    format!("{D}{name}")
}
/// `ms.<phi name>`: the meta-optimizer's accumulator of a meta-parameter.
pub fn ms_name(phi: &str) -> String {
    format!("ms.{phi}")
}
/// Name of the bundle graph of the compiled meta-optimizer.
pub const META_UPDATE: &str = "meta_update";
/// `objective_grad.<theta name>`.
pub fn objective_grad_name(theta: &str) -> String {
    format!("{OBJECTIVE_GRAD}{theta}")
}

/// The input names of an L2O bundle's graphs, by role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L2oLayout {
    /// Meta-parameters (the learned optimizer's weights), `hrnn.*`.
    pub phi: Vec<String>,
    /// Optimizee parameters, `theta.<param>`.
    pub theta: Vec<String>,
    /// Optimizer state, `hrnn.state.*`.
    pub state: Vec<String>,
    /// The state entries that the `reset` graph sets from `phi` (hidden states).
    pub hidden: Vec<String>,
    /// Minibatch inputs of `step` (`batch.<input>`), empty for data-free problems.
    pub batch: Vec<String>,
    /// Objective-set inputs of `step` and `objective` (`obj.<input>`).
    pub objective_batch: Vec<String>,
    /// Transposed copies of objective-set inputs that `step` reads:
    /// `(input name, source name)`, the source being a 2-D `obj.*` input.
    #[serde(default)]
    pub objective_transposed: Vec<(String, String)>,
    /// Parameter sets per `objective_chunk` run (0: a bundle from before
    /// that graph, which this runtime cannot run).
    #[serde(default)]
    pub objective_chunk: usize,
}

impl L2oLayout {
    /// Read the layout from a manifest's `meta` (`meta.l2o.layout`).
    pub fn from_meta(meta: &serde_json::Value) -> Result<Self> {
        let v = meta
            .get("l2o")
            .and_then(|m| m.get("layout"))
            .context("manifest meta has no 'l2o.layout' (not an l2o bundle?)")?;
        serde_json::from_value(v.clone()).context("malformed 'l2o.layout' in manifest meta")
    }
}
