//! The Hessian regularisers of the L2O-Entropy fork, as graphs built from
//! explicit Hessian-vector products of the minibatch loss at `theta_t`.
//!
//! * `hessian`: Hutchinson's trace estimate, the mean over `P` probes `v_i`
//!   (Rademacher, given as inputs) of `v_i^T H v_i`;
//! * `hessian-ev`: the top eigenvalue by `k` steps of power iteration from a
//!   probe (the Rayleigh quotient `v^T H v` of the last normalised iterate);
//! * `hessian-esd`: `m` steps of Lanczos with full reorthogonalisation from a
//!   probe, returning the sum of the Ritz values (the trace of the
//!   tridiagonal matrix, `sum_j alpha_j`);
//! * `jacob`: the mean squared gradient.
//!
//! Every HVP is the forward-mode derivative (JVP) of the loss gradient, which
//! is built once and shared by all probes. The result is an ordinary graph
//! node, so the step's VJP differentiates it (third-order terms in the
//! optimizer's weights through `theta_t`).

use metac_contract::l2o::ProbeKind;
use metac_graphs::autodiff::{inner_product, jvp};
use metac_graphs::{Graph, NodeId};
use serde::{Deserialize, Serialize};

/// Which regulariser (`reg_option` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RegOption {
    /// No regulariser.
    #[default]
    None,
    /// Hutchinson trace.
    Hessian,
    /// Top eigenvalue by power iteration.
    HessianEv,
    /// Sum of Lanczos Ritz values.
    HessianEsd,
    /// Mean squared gradient.
    Jacob,
}

/// The graph-shaping part of a regulariser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegularizerSpec {
    pub option: RegOption,
    /// Probes of `hessian`.
    pub num_probes: usize,
    /// Steps of `hessian-ev`.
    pub power_iterations: usize,
    /// Steps of `hessian-esd`.
    pub lanczos_steps: usize,
}

impl RegularizerSpec {
    /// Number of probe vectors the graph reads (stacked along a leading axis
    /// of each `reg.probe.<theta>` input), 0 for none.
    pub fn probe_count(&self) -> usize {
        match self.option {
            RegOption::None | RegOption::Jacob => 0,
            RegOption::Hessian => self.num_probes,
            RegOption::HessianEv | RegOption::HessianEsd => 1,
        }
    }

    /// How the runtime draws the probes.
    pub fn probe_kind(&self) -> ProbeKind {
        match self.option {
            RegOption::Hessian => ProbeKind::Rademacher,
            _ => ProbeKind::Normal,
        }
    }

    /// The regulariser's value. `theta`: the parameter inputs; `grads`: the
    /// gradient of the loss in `theta` (not stop-gradient'ed); `probes`: one
    /// node per parameter, `[P, *shape]` with `P = probe_count()`.
    pub fn build(
        &self,
        g: &mut Graph,
        theta: &[NodeId],
        grads: &[NodeId],
        probes: &[NodeId],
    ) -> Option<NodeId> {
        match self.option {
            RegOption::None => None,
            RegOption::Jacob => Some(mean_square(g, grads)),
            RegOption::Hessian => {
                let mut total: Option<NodeId> = None;
                for i in 0..self.num_probes {
                    let v = probe(g, probes, i);
                    let hv = hvp(g, theta, grads, &v);
                    let q = inner_product(g, &v, &hv);
                    total = g.add_opt(total, Some(q));
                }
                let n = g.scalar(self.num_probes as f32);
                Some(g.div(total.expect("num_probes >= 1"), n))
            }
            RegOption::HessianEv => {
                let start = probe(g, probes, 0);
                let mut v = normalized(g, &start);
                let mut rayleigh = None;
                for _ in 0..self.power_iterations {
                    let hv = hvp(g, theta, grads, &v);
                    rayleigh = Some(inner_product(g, &v, &hv));
                    v = normalized(g, &hv);
                }
                rayleigh
            }
            RegOption::HessianEsd => {
                let start = probe(g, probes, 0);
                Some(lanczos_ritz_sum(
                    g,
                    theta,
                    grads,
                    &start,
                    self.lanczos_steps,
                ))
            }
        }
    }
}

/// Probe `i` of the stacked `[P, *shape]` inputs, one node per parameter.
fn probe(g: &mut Graph, probes: &[NodeId], i: usize) -> Vec<NodeId> {
    probes
        .iter()
        .map(|&p| {
            let shape = g.shape(p)[1..].to_vec();
            let s = g.slice(p, 0, i, i + 1);
            g.reshape(s, &shape)
        })
        .collect()
}

/// `H v` as the JVP of the gradient in the direction `v`.
fn hvp(g: &mut Graph, theta: &[NodeId], grads: &[NodeId], v: &[NodeId]) -> Vec<NodeId> {
    let pairs: Vec<(NodeId, NodeId)> = theta.iter().copied().zip(v.iter().copied()).collect();
    let t = jvp(g, &pairs, grads);
    t.into_iter()
        .zip(theta)
        .map(|(x, &th)| x.unwrap_or_else(|| g.zeros_like(th)))
        .collect()
}

/// Mean of the squared entries over all tensors.
fn mean_square(g: &mut Graph, xs: &[NodeId]) -> NodeId {
    let count: usize = xs
        .iter()
        .map(|&x| g.shape(x).iter().product::<usize>())
        .sum();
    let ss = inner_product(g, xs, xs);
    let n = g.scalar(count as f32);
    g.div(ss, n)
}

/// Squared norms below this are treated as zero when normalising, so that a
/// Krylov space exhausted before `m` steps (a Hessian of rank < m) gives
/// zero vectors instead of NaN.
const NORM_FLOOR: f32 = 1e-30;

/// `(v / |v|, |v|)` over the tensors of `v`.
fn normalize_with_norm(g: &mut Graph, v: &[NodeId]) -> (Vec<NodeId>, NodeId) {
    let ss = inner_product(g, v, v);
    let ss = g.add_scalar(ss, NORM_FLOOR);
    let norm = g.sqrt(ss);
    (v.iter().map(|&x| g.div(x, norm)).collect(), norm)
}

fn normalized(g: &mut Graph, v: &[NodeId]) -> Vec<NodeId> {
    normalize_with_norm(g, v).0
}

/// `a - c b`, tensor by tensor, for a scalar node `c`.
fn sub_scaled(g: &mut Graph, a: &[NodeId], c: NodeId, b: &[NodeId]) -> Vec<NodeId> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let cy = g.mul(c, y);
            g.sub(x, cy)
        })
        .collect()
}

/// `m` Lanczos steps from `start` with full reorthogonalisation (classical
/// Gram-Schmidt against every earlier basis vector, after the three-term
/// recurrence); returns `sum_j alpha_j`, the sum of the Ritz values.
fn lanczos_ritz_sum(
    g: &mut Graph,
    theta: &[NodeId],
    grads: &[NodeId],
    start: &[NodeId],
    m: usize,
) -> NodeId {
    let mut basis: Vec<Vec<NodeId>> = vec![normalized(g, start)];
    let mut beta_prev: Option<NodeId> = None;
    let mut total: Option<NodeId> = None;
    for j in 0..m {
        let q = basis[j].clone();
        let w = hvp(g, theta, grads, &q);
        let alpha = inner_product(g, &q, &w);
        total = g.add_opt(total, Some(alpha));
        if j + 1 == m {
            break;
        }
        let mut w = sub_scaled(g, &w, alpha, &q);
        if let Some(b) = beta_prev {
            let prev = basis[j - 1].clone();
            w = sub_scaled(g, &w, b, &prev);
        }
        for qi in basis.clone() {
            let c = inner_product(g, &qi, &w);
            w = sub_scaled(g, &w, c, &qi);
        }
        let (next, beta) = normalize_with_norm(g, &w);
        basis.push(next);
        beta_prev = Some(beta);
    }
    total.expect("m >= 1")
}
