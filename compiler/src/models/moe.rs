//! The mixture of SwiGLU experts that replaces a transformer block's MLP in
//! the Tiny-ONN workload ([`crate::models::transformer::Gpt`] with
//! `moe` set), the per-token, per-expert *surprise* and the router loss.
//!
//! **The block** (`x [N, d]`, `E` experts of hidden width `H`):
//! * router: `logits = x Wr + br [N, E]`, `p = softmax(logits)`;
//! * selection ([`select`]): experts in decreasing `p` (ties: lower index
//!   first) are taken until the probability of those taken before reaches
//!   `budget`, with at least `min_k` and at most `max_k`; a mask `active`
//!   `[N, E]` of 0 and 1, from comparisons, so it has no derivative;
//! * gates: `w = p * active / sum(p * active)`, the probabilities
//!   renormalised over the active experts;
//! * experts, all evaluated (static shapes): `a = silu(x W1) * (x W3)`
//!   `[N, E H]` (expert `e` owns columns `e H .. (e + 1) H`), and the output
//!   `y = (a * w per expert) W2`, one matmul for all experts.
//!
//! **Surprise** ([`surprise`]). For token `t` and expert `e`,
//! `s[t, e] = || J_e(x_t)^T g_t ||`: the norm of the gradient of the main
//! loss with respect to the expert's *input*, for the expert carrying the
//! token alone at gate 1, where `g_t = dL/dy_t` is the adjoint of the
//! block's output and `J_e` the Jacobian of expert `e`'s SwiGLU. Why the
//! input, and why at gate 1: the adjoint of an expert's output is
//! `w[t, e] g_t`, the same vector for every expert scaled by its gate, so
//! any output-side or gate-weighted measure ranks the gates and not the
//! experts, and is 0 for every inactive expert. `J_e^T g_t` differs between
//! experts through their weights and is defined for all of them, active or
//! not, because every expert is evaluated. It costs the expert part of one
//! more data backward: two batched matmuls `[E, N, H] x [E, H, d]`.
//!
//! **Router loss** ([`router_loss`]): the cross-entropy of the router's
//! logits to the expert of least surprise over *all* experts (an argmin
//! over the active experts only lets the router collapse onto one expert
//! per token, where it is trivially right), optionally plus
//! `kl * KL(softmax(-s / tau) || p)` and `k_penalty * H(p)` (the entropy of
//! the router distribution: `k` is a step function of the logits with no
//! derivative; a sharper distribution reaches the budget with fewer
//! experts). The selection takes experts in decreasing probability and the
//! cross-entropy raises the target's logit, so a router step on it can only
//! move the target forward in the selection order (tested).

use metac_contract::moe::MoeConfig;
use metac_graphs::{DType, Graph, NodeId, Tensor};

/// One block's mixture in a graph: what the surprise and the router loss
/// need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeLayer {
    /// The block's input `[N, d]` (after its layer norm).
    pub input: NodeId,
    /// Router logits `[N, E]`.
    pub logits: NodeId,
    /// Active experts, f32 0/1 `[N, E]`.
    pub active: NodeId,
    /// Gate weights `[N, E]` (0 where inactive).
    pub gates: NodeId,
    /// The experts' pre-activations `x W1` and `x W3`, `[N, E H]`.
    pub p1: NodeId,
    pub p3: NodeId,
    /// The block's output `[N, d]`.
    pub output: NodeId,
    pub w1: NodeId,
    pub w3: NodeId,
    pub w2: NodeId,
}

/// A block's parameters: router `wr [d, E]`, `br [E]`; experts `w1`, `w3`
/// `[d, E H]`, `w2 [E H, d]`.
pub struct MoeParams {
    pub wr: NodeId,
    pub br: NodeId,
    pub w1: NodeId,
    pub w3: NodeId,
    pub w2: NodeId,
}

/// `x * sigmoid(x)`.
pub fn silu(g: &mut Graph, x: NodeId) -> NodeId {
    let s = g.sigmoid(x);
    g.mul(x, s)
}

/// A dense SwiGLU MLP: `(silu(x W1) * (x W3)) W2`.
pub fn swiglu(g: &mut Graph, x: NodeId, w1: NodeId, w3: NodeId, w2: NodeId) -> NodeId {
    let p1 = g.matmul(x, w1);
    let p3 = g.matmul(x, w3);
    let s = silu(g, p1);
    let a = g.mul(s, p3);
    g.matmul(a, w2)
}

/// The mixture on `x [N, d]`; see the module docs. With `detach_experts`
/// the experts read `x` through a stop-gradient, so that reverse mode gives
/// their weights' gradients but not `x`'s through them: the caller adds that
/// from [`surprise_and_input_grad`] (the hyper step).
pub fn block(
    g: &mut Graph,
    x: NodeId,
    p: &MoeParams,
    cfg: &MoeConfig,
    detach_experts: bool,
) -> MoeLayer {
    let n = g.shape(x)[0];
    let (e, h) = (cfg.experts, cfg.hidden);
    let logits = g.matmul(x, p.wr);
    let logits = g.add(logits, p.br);
    let probs = g.softmax(logits, 1);
    let active = select(g, probs, cfg);
    let kept = g.mul(probs, active);
    let total = g.sum(kept, &[1], true);
    let gates = g.div(kept, total);
    let xe = if detach_experts {
        g.stop_gradient(x)
    } else {
        x
    };
    let p1 = g.matmul(xe, p.w1);
    let p3 = g.matmul(xe, p.w3);
    let s = silu(g, p1);
    let a = g.mul(s, p3);
    let a = g.reshape(a, &[n, e, h]);
    let w = g.reshape(gates, &[n, e, 1]);
    let a = g.mul(a, w);
    let a = g.reshape(a, &[n, e * h]);
    let output = g.matmul(a, p.w2);
    MoeLayer {
        input: x,
        logits,
        active,
        gates,
        p1,
        p3,
        output,
        w1: p.w1,
        w3: p.w3,
        w2: p.w2,
    }
}

/// The active experts of router probabilities `probs [N, E]` (f32 0/1
/// `[N, E]`, no derivative): expert `e` is active when fewer than `min_k`
/// experts come before it, or when the probability of those before it is
/// below `budget` (always, for a budget of 1) and fewer than `max_k` come
/// before it. Expert `f` comes before `e` when `p_f > p_e`, or
/// `p_f = p_e` and `f < e`.
pub fn select(g: &mut Graph, probs: NodeId, cfg: &MoeConfig) -> NodeId {
    let n = g.shape(probs)[0];
    let e = cfg.experts;
    let q = g.stop_gradient(probs);
    let pe = g.reshape(q, &[n, e, 1]);
    let pf = g.reshape(q, &[n, 1, e]);
    let gt = g.greater(pf, pe);
    let gt = g.cast(gt, DType::F32);
    let eq = g.equal(pf, pe);
    let eq = g.cast(eq, DType::F32);
    let lower = Tensor::f32(
        &[e, e],
        (0..e * e)
            .map(|k| if k % e < k / e { 1.0 } else { 0.0 })
            .collect(),
    );
    let lower = g.constant(lower);
    let tie = g.mul(eq, lower);
    let before = g.add(gt, tie); // [N, E (e), E (f)]: 1 where f comes before e
    let rank = g.sum(before, &[2], false);
    let min_k = g.scalar(cfg.min_k as f32);
    let forced = g.less(rank, min_k);
    let forced = g.cast(forced, DType::F32);
    let max_k = g.scalar(cfg.max_k() as f32);
    let room = g.less(rank, max_k);
    let mut open = g.cast(room, DType::F32);
    if cfg.budget < 1.0 {
        let mass = g.mul(before, pf);
        let prefix = g.sum(mass, &[2], false);
        let budget = g.scalar(cfg.budget as f32);
        let under = g.less(prefix, budget);
        let under = g.cast(under, DType::F32);
        open = g.mul(open, under);
    }
    g.max(forced, open)
}

/// Per token and expert, `||J_e(x_t)^T dy_t||` for the adjoint `dy [N, d]`
/// of the block's output: `[N, E]`; see the module docs.
pub fn surprise(g: &mut Graph, layer: &MoeLayer, cfg: &MoeConfig, dy: NodeId) -> NodeId {
    let dx = expert_input_grads(g, layer, cfg, dy);
    norms(g, dx)
}

/// `[N, E]` norms over the last axis of `dx [E, N, d]`.
fn norms(g: &mut Graph, dx: NodeId) -> NodeId {
    let sq = g.square(dx);
    let ss = g.sum(sq, &[2], false);
    let norm = g.sqrt(ss);
    g.transpose(norm, &[1, 0])
}

/// The surprise `[N, E]` and the block input's adjoint through the experts,
/// `sum_e w[t, e] J_e(x_t)^T dy_t` `[N, d]`, from one computation of every
/// expert's `J_e^T dy` at gate 1: the custom derivative of the experts'
/// data path that the hyper step uses (the block built with
/// `detach_experts`, whose expert matmuls read the input through a
/// stop-gradient).
pub fn surprise_and_input_grad(
    g: &mut Graph,
    layer: &MoeLayer,
    cfg: &MoeConfig,
    dy: NodeId,
) -> (NodeId, NodeId) {
    let n = g.shape(dy)[0];
    let e = cfg.experts;
    let dx = expert_input_grads(g, layer, cfg, dy); // [E, N, d]
    let s = norms(g, dx);
    let w = g.transpose(layer.gates, &[1, 0]);
    let w = g.reshape(w, &[e, n, 1]);
    let wdx = g.mul(dx, w);
    let dx_in = g.sum(wdx, &[0], false);
    (s, dx_in)
}

/// Every expert's `J_e(x_t)^T dy_t`, `[E, N, d]`.
fn expert_input_grads(g: &mut Graph, layer: &MoeLayer, cfg: &MoeConfig, dy: NodeId) -> NodeId {
    let n = g.shape(dy)[0];
    let d = g.shape(dy)[1];
    let (e, h) = (cfg.experts, cfg.hidden);
    let w2t = g.transpose(layer.w2, &[1, 0]);
    let u = g.matmul(dy, w2t); // dL/da at gate 1, [N, E H]
    let s = g.sigmoid(layer.p1);
    let silu_p1 = g.mul(layer.p1, s);
    // silu'(z) = s (1 + z (1 - s))
    let one_minus = g.neg(s);
    let one_minus = g.add_scalar(one_minus, 1.0);
    let z1 = g.mul(layer.p1, one_minus);
    let z1 = g.add_scalar(z1, 1.0);
    let dsilu = g.mul(s, z1);
    let dp1 = g.mul(u, layer.p3);
    let dp1 = g.mul(dp1, dsilu);
    let dp3 = g.mul(u, silu_p1);
    let per_expert = |g: &mut Graph, a: NodeId| {
        let a = g.reshape(a, &[n, e, h]);
        g.transpose(a, &[1, 0, 2]) // [E, N, H]
    };
    let weights = |g: &mut Graph, w: NodeId| {
        let w = g.reshape(w, &[d, e, h]);
        g.transpose(w, &[1, 2, 0]) // [E, H, d]
    };
    let (a1, a3) = (per_expert(g, dp1), per_expert(g, dp3));
    let (w1, w3) = (weights(g, layer.w1), weights(g, layer.w3));
    let x1 = g.matmul(a1, w1);
    let x3 = g.matmul(a3, w3);
    g.add(x1, x3) // [E, N, d]
}

/// The router logits of `layer` from its input taken as data: their
/// derivative reaches the router's parameters and nothing else.
pub fn router_logits(g: &mut Graph, layer: &MoeLayer, wr: NodeId, br: NodeId) -> NodeId {
    let x = g.stop_gradient(layer.input);
    let l = g.matmul(x, wr);
    g.add(l, br)
}

/// The Switch Transformer's load-balancing loss of a block,
/// `E * sum_e f_e P_e`: `f_e` the share of the token-expert assignments
/// that go to expert `e` (from the selection, no derivative), `P_e` its
/// mean router probability. 1 when both are uniform.
pub fn balance_loss(g: &mut Graph, layer: &MoeLayer) -> NodeId {
    let e = g.shape(layer.logits)[1];
    let active = g.stop_gradient(layer.active);
    let per_expert = g.sum(active, &[0], false);
    let total = g.sum_all(active);
    let f = g.div(per_expert, total);
    let probs = g.softmax(layer.logits, 1);
    let p = g.mean(probs, &[0], false);
    let fp = g.mul(f, p);
    let s = g.sum_all(fp);
    g.mul_scalar(s, e as f32)
}

/// The router loss's optional terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterLossWeights {
    /// Weight of `KL(softmax(-s / tau) || p)` (0: off).
    pub kl: NodeId,
    /// Temperature `tau` of that target (relative to the mean surprise of
    /// the token).
    pub tau: f32,
    /// Weight of the router distribution's entropy (0: off).
    pub k_penalty: NodeId,
}

/// A block's router loss and what it measured, each a scalar over the
/// tokens weighted by `weights [N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterTerms {
    pub loss: NodeId,
    /// Cross-entropy to the least-surprised expert.
    pub ce: NodeId,
    pub kl: NodeId,
    pub entropy: NodeId,
    /// Fraction of tokens whose active set holds the least-surprised
    /// expert (ties share).
    pub gating_accuracy: NodeId,
    /// Mean number of active experts per token.
    pub mean_k: NodeId,
}

/// The router loss of router logits `logits [N, E]` whose selection is
/// `active [N, E]`, given the surprise `[N, E]` (taken as data: no
/// derivative flows into it) and token weights `weights [N]`.
///
/// The hyper step passes logits recomputed from the block's input taken as
/// data ([`router_logits`]), so that each router learns from its own
/// block's loss only, as a classifier of its input.
pub fn router_loss(
    g: &mut Graph,
    logits: NodeId,
    active: NodeId,
    surprise: NodeId,
    weights: NodeId,
    opts: &RouterLossWeights,
) -> RouterTerms {
    let s = g.stop_gradient(surprise);
    // The least-surprised expert over all experts; ties share the target.
    let neg = g.neg(s);
    let top = g.reduce_max(neg, &[1], true);
    let is_min = g.equal(neg, top);
    let is_min = g.cast(is_min, DType::F32);
    let count = g.sum(is_min, &[1], true);
    let target = g.div(is_min, count);
    let logp = g.log_softmax(logits, 1);
    let wsum = g.sum_all(weights);
    let one = g.scalar(1.0);
    let wsum = g.max(wsum, one);
    // sum_t weights[t] * v[t] / sum(weights), for v [N].
    let wmean = |g: &mut Graph, v: NodeId| {
        let wv = g.mul(v, weights);
        let t = g.sum_all(wv);
        g.div(t, wsum)
    };
    let tl = g.mul(target, logp);
    let tl = g.sum(tl, &[1], false);
    let ce = g.neg(tl);
    let ce = wmean(g, ce);
    // KL(q || p) with q = softmax(-s / (tau * mean_e s)).
    let scale = g.mean(s, &[1], true);
    let scale = g.mul_scalar(scale, opts.tau);
    let scale = g.add_scalar(scale, 1e-12);
    let z = g.div(neg, scale);
    let logq = g.log_softmax(z, 1);
    let q = g.exp(logq);
    let diff = g.sub(logq, logp);
    let kl = g.mul(q, diff);
    let kl = g.sum(kl, &[1], false);
    let kl = wmean(g, kl);
    let p = g.exp(logp);
    let plogp = g.mul(p, logp);
    let ent = g.sum(plogp, &[1], false);
    let ent = g.neg(ent);
    let entropy = wmean(g, ent);
    let kl_term = g.mul(opts.kl, kl);
    let ent_term = g.mul(opts.k_penalty, entropy);
    let loss = g.add(ce, kl_term);
    let loss = g.add(loss, ent_term);
    let active = g.stop_gradient(active);
    let hit = g.mul(active, target);
    let hit = g.sum(hit, &[1], false);
    let gating_accuracy = wmean(g, hit);
    let k = g.sum(active, &[1], false);
    let mean_k = wmean(g, k);
    RouterTerms {
        loss,
        ce,
        kl,
        entropy,
        gating_accuracy,
        mean_k,
    }
}
