//! The mixture-of-experts LM program (`metac compile moe`, Tiny-ONN): the
//! byte-level GPT of [`crate::models::transformer`] with mixtures of
//! SwiGLU experts ([`crate::models::moe`]), compiled into a bundle whose
//! `train_step` is the seed's two-backward *hyper step* as one graph; see
//! `metac_contract::moe` for the names and `docs/tiny-onn.md` for the
//! design.
//!
//! **The hyper step** (`[train] mode = "hyper"`), in the seed's order:
//! 1-2. forward and the main loss `L_main` (mean next-byte cross-entropy);
//! 3. one reverse pass of `L_main` that yields the gradient of every
//!    parameter but the routers' *and* each block's surprise `[N, E]`
//!    ([`main_backward`]: a custom derivative of the experts' data path
//!    computes every expert's `J_e^T dy` once, for the surprise and for the
//!    block input's adjoint);
//! 4-5. the main Adam steps every parameter but the routers';
//! 6-7. the router loss of each block from its surprise (taken as data);
//! 8. its gradient for the routers' parameters only, through the block's
//!    logits recomputed from its input taken as data;
//! 9-10. the router Adam steps the routers.
//!
//! Nothing of the router loss reaches the surprise or the main gradient:
//! they are computed from `L_main` alone, and the router loss reads the
//! surprise through a stop-gradient (tested bit for bit by changing the
//! router loss's weights, which are graph inputs). "Zeroing" an optimizer
//! has no counterpart: a graph's gradients are values, not accumulators.
//!
//! **The single-backward step** (`"joint"`): one reverse pass of
//! `L_main + balance * sum_l LB_l` and one Adam over every parameter; the
//! top-k MoE with a load-balancing loss and the dense SwiGLU model of the
//! comparisons.

use std::path::Path;

use anyhow::{Context, Result};
use metac_contract::bundle::{BundleBuilder, Manifest, Port, StateBuffer};
use metac_contract::init::TensorInit;
use metac_contract::moe::{
    MoeLmConfig, MoeMeta, TrainMode, MOE_EVALUATE, MOE_KIND, MOE_LOGITS, MOE_TRAIN_STEP,
};
use metac_graphs::autodiff::{grad, vjp, vjp_with_hook};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph, NodeId, Tensor};

use crate::models::baselines::{constant_rules, Adam, StepOptimizer, LR_SCALE};
use crate::models::moe::{self, MoeLayer, RouterLossWeights};
use crate::models::transformer::Gpt;

/// `train_step`'s scalar input multiplying the router Adam's rate.
pub const ROUTER_LR_SCALE: &str = "router_lr_scale";
/// `train_step`'s scalar inputs weighting the router loss's optional terms.
pub const ROUTER_KL: &str = "router.kl";
pub const ROUTER_K_PENALTY: &str = "router.k_penalty";

/// Whether parameter `name` belongs to a router (the router optimizer's
/// part of the partition).
pub fn is_router_param(name: &str) -> bool {
    name.contains(".moe.router.")
}

/// A built `train_step` and the names the runtime needs.
pub struct MoeTrainStep {
    pub graph: Graph,
    pub params: Vec<String>,
    pub router_params: Vec<String>,
    /// State names and initial values, in input order.
    pub state: Vec<(String, Tensor)>,
    pub metrics: Vec<String>,
}

fn adam(lr: f64, c: &MoeLmConfig) -> Adam {
    Adam {
        lr: lr as f32,
        beta1: c.train.beta1 as f32,
        beta2: c.train.beta2 as f32,
        eps: c.train.eps as f32,
        scaled_lr: true,
    }
}

/// Per-layer measurements of a batch: the mean active experts and, where
/// the surprise is known, the gating accuracy and the router loss.
fn layer_metrics(
    g: &mut Graph,
    layers: &[MoeLayer],
    surprise: &[NodeId],
    router: &[Option<moe::RouterTerms>],
    weights: NodeId,
) -> Vec<(String, NodeId)> {
    let mut out = vec![];
    for (l, layer) in layers.iter().enumerate() {
        let k = g.sum(layer.active, &[1], false);
        let k = g.mean(k, &[0], false);
        out.push((format!("mean_k.l{l}"), k));
        if let Some(&s) = surprise.get(l) {
            let t = match router.get(l).copied().flatten() {
                Some(t) => t,
                None => {
                    // Measurements only: weights 0 on the optional terms.
                    let zero = g.scalar(0.0);
                    let opts = RouterLossWeights {
                        kl: zero,
                        tau: 1.0,
                        k_penalty: zero,
                    };
                    moe::router_loss(g, layer.logits, layer.active, s, weights, &opts)
                }
            };
            out.push((format!("gating_accuracy.l{l}"), t.gating_accuracy));
            out.push((format!("router_ce.l{l}"), t.ce));
        }
    }
    out
}

/// Token weights `[B T]` of ones and `[B, T]` for the loss.
fn ones(g: &mut Graph, b: usize, t: usize) -> (NodeId, NodeId) {
    let w = g.constant(Tensor::f32(&[b, t], vec![1.0; b * t]));
    let flat = g.constant(Tensor::f32(&[b * t], vec![1.0; b * t]));
    (w, flat)
}

/// Step 3 of the hyper step: one reverse pass of `loss` (built by
/// [`Gpt::loss_moe_with`] with `detach_experts`) for the parameters `wrt`,
/// whose custom derivative at each block's output computes every expert's
/// `J_e^T dy` once and takes from it both the surprise and the block
/// input's adjoint through the experts ([`moe::surprise_and_input_grad`]).
/// Plain reverse mode would compute that adjoint gate-weighted, and the
/// surprise would cost the experts' data backward a second time. Returns
/// the gradients (zeros where `loss` does not depend on a parameter) and
/// the surprise `[N, E]` of every block.
pub fn main_backward(
    g: &mut Graph,
    gpt: &Gpt,
    loss: NodeId,
    layers: &[MoeLayer],
    wrt: &[NodeId],
) -> (Vec<NodeId>, Vec<NodeId>) {
    let cfg = gpt.config.moe.as_ref().expect("a mixture");
    let seed = g.fill(1.0, DType::F32, &[]);
    let outputs: Vec<NodeId> = layers.iter().map(|l| l.output).collect();
    let mut surprise: Vec<Option<NodeId>> = vec![None; layers.len()];
    let cots = vjp_with_hook(g, &[(loss, seed)], wrt, &outputs, &mut |g, node, dy| {
        let l = outputs
            .iter()
            .position(|&o| o == node)
            .expect("a hooked output");
        let (s, dx) = moe::surprise_and_input_grad(g, &layers[l], cfg, dy);
        surprise[l] = Some(s);
        vec![(layers[l].input, dx)]
    });
    let grads = cots
        .iter()
        .zip(wrt)
        .map(|(c, &p)| c.unwrap_or_else(|| g.zeros_like(p)))
        .collect();
    let surprise = surprise
        .into_iter()
        .map(|s| s.expect("the loss depends on every block"))
        .collect();
    (grads, surprise)
}

/// The `train_step` of `c` (see the module docs).
pub fn build_train_step(gpt: &Gpt, c: &MoeLmConfig) -> MoeTrainStep {
    let (b, t) = (c.train.batch, gpt.config.context);
    let mut g = Graph::new();
    let shapes = gpt.param_shapes();
    let names: Vec<String> = shapes.iter().map(|(n, _)| n.clone()).collect();
    let params = gpt.params(&mut g);
    let router_idx: Vec<usize> = (0..names.len())
        .filter(|&i| is_router_param(&names[i]))
        .collect();
    let main_idx: Vec<usize> = (0..names.len())
        .filter(|&i| !is_router_param(&names[i]))
        .collect();
    let mode = c.train.mode;
    // State inputs: the main Adam's (all parameters in joint mode), then the
    // router Adam's.
    let main_opt = adam(c.train.lr, c);
    let router_opt = adam(c.train.router_lr, c);
    let (main_part, router_part): (Vec<usize>, Vec<usize>) = match mode {
        TrainMode::Hyper => (main_idx, router_idx.clone()),
        TrainMode::Joint => ((0..names.len()).collect(), vec![]),
    };
    let shapes_of = |idx: &[usize]| idx.iter().map(|&i| shapes[i].1.clone()).collect::<Vec<_>>();
    let mut state_init = vec![];
    let mut state_inputs = |g: &mut Graph, prefix: &str, opt: &Adam, idx: &[usize]| {
        let init = opt.initial_state(&shapes_of(idx));
        init.into_iter()
            .map(|(n, v)| {
                let name = format!("{prefix}{n}");
                let id = g.input(&name, DType::F32, &v.shape);
                state_init.push((name, v));
                id
            })
            .collect::<Vec<_>>()
    };
    let main_state = state_inputs(&mut g, "main.", &main_opt, &main_part);
    let router_state = if router_part.is_empty() {
        vec![]
    } else {
        state_inputs(&mut g, "router.", &router_opt, &router_part)
    };
    let tokens = g.input("tokens", DType::I64, &[b, t]);
    let targets = g.input("targets", DType::I64, &[b, t]);
    let (w, wflat) = ones(&mut g, b, t);
    // The hyper step's mixtures read their input through a stop-gradient:
    // main_backward gives the experts' data path its own derivative.
    let detach = mode == TrainMode::Hyper;
    let (loss, layers) = gpt.loss_moe_with(&mut g, &params, tokens, targets, w, detach);
    let mut new_params: Vec<Option<NodeId>> = vec![None; names.len()];
    let mut outputs: Vec<(String, NodeId)> = vec![];
    let mut metrics = vec![];
    match mode {
        TrainMode::Hyper => {
            // 3. One reverse pass of L_main: the main gradients and the
            // blocks' surprise.
            let ps: Vec<NodeId> = main_part.iter().map(|&i| params[i]).collect();
            let (grads, surprise) = main_backward(&mut g, gpt, loss, &layers, &ps);
            // 4-5. The main Adam.
            let (np, ns) = main_opt.step_scaled(&mut g, &ps, &grads, &main_state, Some(LR_SCALE));
            for (&i, p) in main_part.iter().zip(np) {
                new_params[i] = Some(p);
            }
            for ((n, _), s) in state_init.iter().zip(&ns) {
                outputs.push((format!("new.{n}"), *s));
            }
            // 6-8. The router losses and their gradient for the routers.
            let kl = g.input(ROUTER_KL, DType::F32, &[]);
            let k_penalty = g.input(ROUTER_K_PENALTY, DType::F32, &[]);
            let opts = RouterLossWeights {
                kl,
                tau: c.router.tau as f32,
                k_penalty,
            };
            let mut terms = vec![];
            let mut total: Option<NodeId> = None;
            for (l, layer) in layers.iter().enumerate() {
                let wr = params[router_part[2 * l]];
                let br = params[router_part[2 * l + 1]];
                let logits = moe::router_logits(&mut g, layer, wr, br);
                let t = moe::router_loss(&mut g, logits, layer.active, surprise[l], wflat, &opts);
                total = g.add_opt(total, Some(t.loss));
                terms.push(Some(t));
                outputs.push((format!("router_loss.l{l}"), t.loss));
                metrics.push(format!("router_loss.l{l}"));
            }
            let total = total.expect("a mixture has blocks");
            let rps: Vec<NodeId> = router_part.iter().map(|&i| params[i]).collect();
            let rgrads = grad(&mut g, total, &rps);
            // 9-10. The router Adam.
            let (np, ns) =
                router_opt.step_scaled(&mut g, &rps, &rgrads, &router_state, Some(ROUTER_LR_SCALE));
            for (&i, p) in router_part.iter().zip(np) {
                new_params[i] = Some(p);
            }
            let router_n = ns.len();
            for ((n, _), s) in state_init[state_init.len() - router_n..].iter().zip(&ns) {
                outputs.push((format!("new.{n}"), *s));
            }
            for (name, id) in layer_metrics(&mut g, &layers, &surprise, &terms, wflat) {
                outputs.push((name.clone(), id));
                metrics.push(name);
            }
            for (l, &s) in surprise.iter().enumerate() {
                outputs.push((format!("surprise.l{l}"), s));
            }
        }
        TrainMode::Joint => {
            let mut objective = loss;
            if c.train.balance > 0.0 {
                for (l, layer) in layers.iter().enumerate() {
                    let lb = moe::balance_loss(&mut g, layer);
                    outputs.push((format!("balance.l{l}"), lb));
                    metrics.push(format!("balance.l{l}"));
                    let term = g.mul_scalar(lb, c.train.balance as f32);
                    objective = g.add(objective, term);
                }
            }
            let grads = grad(&mut g, objective, &params);
            let (np, ns) =
                main_opt.step_scaled(&mut g, &params, &grads, &main_state, Some(LR_SCALE));
            for (i, p) in np.into_iter().enumerate() {
                new_params[i] = Some(p);
            }
            for ((n, _), s) in state_init.iter().zip(&ns) {
                outputs.push((format!("new.{n}"), *s));
            }
            for (name, id) in layer_metrics(&mut g, &layers, &[], &[], wflat) {
                outputs.push((name.clone(), id));
                metrics.push(name);
            }
        }
    }
    for (n, p) in names.iter().zip(&new_params) {
        g.output(&format!("new.{n}"), p.expect("every parameter is updated"));
    }
    g.output("loss", loss);
    for (n, id) in outputs {
        g.output(&n, id);
    }
    let router_params = router_idx.iter().map(|&i| names[i].clone()).collect();
    MoeTrainStep {
        graph: g,
        params: names,
        router_params,
        state: state_init,
        metrics,
    }
}

/// The `evaluate` graph: summed next-byte NLL over `e` windows
/// (`nll_sum`), and per block the mean active experts, the gating accuracy
/// and the router's cross-entropy (from the surprise of this batch's own
/// backward), the surprise and the active experts.
pub fn build_evaluate(gpt: &Gpt, e: usize) -> Graph {
    let t = gpt.config.context;
    let mut g = Graph::new();
    let params = gpt.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[e, t]);
    let targets = g.input("targets", DType::I64, &[e, t]);
    let (w, wflat) = ones(&mut g, e, t);
    let (loss, layers) = gpt.loss_moe(&mut g, &params, tokens, targets, w);
    let nll_sum = g.mul_scalar(loss, (e * t) as f32);
    g.output("nll_sum", nll_sum);
    let mut surprise = vec![];
    if let Some(cfg) = gpt.config.moe.as_ref() {
        let wrt: Vec<NodeId> = layers.iter().map(|l| l.output).collect();
        let seed = g.fill(1.0, DType::F32, &[]);
        let cots = vjp(&mut g, &[(loss, seed)], &wrt);
        for (layer, dy) in layers.iter().zip(cots) {
            let dy = dy.expect("the loss depends on every block");
            surprise.push(moe::surprise(&mut g, layer, cfg, dy));
        }
    }
    for (name, id) in layer_metrics(&mut g, &layers, &surprise, &[], wflat) {
        g.output(&name, id);
    }
    for (l, (&s, layer)) in surprise.iter().zip(&layers).enumerate() {
        g.output(&format!("surprise.l{l}"), s);
        g.output(&format!("active.l{l}"), layer.active);
    }
    g
}

/// The `logits` graph: `tokens [1, T]` to `logits [1, T, 256]`.
pub fn build_logits(gpt: &Gpt) -> Graph {
    let mut g = Graph::new();
    let params = gpt.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[1, gpt.config.context]);
    let logits = gpt.logits(&mut g, &params, tokens);
    g.output("logits", logits);
    g
}

/// Compile `config` into a bundle in `out`.
pub fn compile_moe(config: &MoeLmConfig, out: &Path) -> Result<Manifest> {
    config.validate()?;
    let model = config.gpt();
    let gpt = Gpt::new(model.clone()).map_err(anyhow::Error::msg)?;
    let step = build_train_step(&gpt, config);
    let evaluate = build_evaluate(&gpt, config.train.eval_batch);
    let logits = build_logits(&gpt);
    let mut b = BundleBuilder::new(MOE_KIND);
    b.graph(MOE_TRAIN_STEP, &optimize(&step.graph))
        .context("exporting train_step")?;
    b.graph(MOE_EVALUATE, &optimize(&evaluate))
        .context("exporting evaluate")?;
    b.graph(MOE_LOGITS, &optimize(&logits))
        .context("exporting logits")?;
    let port = |graph: &str, tensor: &str| Port {
        graph: graph.into(),
        tensor: tensor.into(),
    };
    let init: Vec<TensorInit> = gpt.init_rules();
    for r in &init {
        b.state(StateBuffer {
            name: r.name.clone(),
            dtype: "f32".into(),
            shape: r.shape.clone(),
            init: None,
            reads: vec![
                port(MOE_TRAIN_STEP, &r.name),
                port(MOE_EVALUATE, &r.name),
                port(MOE_LOGITS, &r.name),
            ],
            updated_by: Some(port(MOE_TRAIN_STEP, &format!("new.{}", r.name))),
        });
    }
    let state_init = constant_rules(step.state.clone())?;
    for r in &state_init {
        b.state(StateBuffer {
            name: r.name.clone(),
            dtype: "f32".into(),
            shape: r.shape.clone(),
            init: None,
            reads: vec![port(MOE_TRAIN_STEP, &r.name)],
            updated_by: Some(port(MOE_TRAIN_STEP, &format!("new.{}", r.name))),
        });
    }
    let mut shown = serde_json::to_value(config)?;
    if let Some(o) = shown.as_object_mut() {
        o.remove("run");
    }
    let hyper = config.train.mode == TrainMode::Hyper;
    let meta = MoeMeta {
        config: shown,
        model,
        mode: config.train.mode,
        batch: config.train.batch,
        eval_batch: config.train.eval_batch,
        params: step.params,
        router_params: step.router_params,
        state: step.state.iter().map(|(n, _)| n.clone()).collect(),
        lr_scale: LR_SCALE.into(),
        router_lr_scale: hyper.then(|| ROUTER_LR_SCALE.into()),
        router_kl: hyper.then(|| ROUTER_KL.into()),
        router_k_penalty: hyper.then(|| ROUTER_K_PENALTY.into()),
        metrics: step.metrics,
        init,
        state_init,
    };
    b.meta(meta.to_meta());
    b.write(out)
}
