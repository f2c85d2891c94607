//! Hand-designed baseline optimizers as step graphs, with the calling
//! convention of the learned optimizer: `(params, grads, state) ->
//! (new params, new state)`.
//!
//! Hyperparameters are f32 graph constants fixed when the graph is built
//! (a struct per optimizer). State tensors have their parameter's shape and
//! are named `{optimizer}.p{k}.{slot}`; scalar states `{optimizer}.{slot}`.
//! Every formula is written out on its struct, with the convention it follows
//! where frameworks differ.

use metac_contract::init::{InitRule, TensorInit};
use metac_graphs::{DType, Graph, NodeId, Tensor};

/// A step-graph optimizer.
pub trait StepOptimizer {
    /// Short name, used as the prefix of state names.
    fn name(&self) -> &'static str;
    /// Names and shapes of the state, in the order `step` takes it.
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)>;
    /// Initial state values, in `state_specs` order.
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)>;
    /// One step: returns the new parameters and the new state.
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>);

    /// Declare the state as f32 graph inputs named per `state_specs`.
    fn state_inputs(&self, g: &mut Graph, param_shapes: &[Vec<usize>]) -> Vec<NodeId> {
        self.state_specs(param_shapes)
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect()
    }
}

/// One state tensor per parameter, shaped like it: `<opt>.p<k>.<slot>`.
fn per_param(opt: &str, slot: &str, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
    param_shapes
        .iter()
        .enumerate()
        .map(|(k, s)| (format!("{opt}.p{k}.{slot}"), s.clone()))
        .collect()
}

fn filled(specs: Vec<(String, Vec<usize>)>, value: impl Fn(&str) -> f32) -> Vec<(String, Tensor)> {
    specs
        .into_iter()
        .map(|(n, s)| {
            let v = value(&n);
            let t = Tensor::f32(&s, vec![v; s.iter().product()]);
            (n, t)
        })
        .collect()
}

fn check(
    name: &str,
    g: &Graph,
    params: &[NodeId],
    grads: &[NodeId],
    state: &[NodeId],
    specs: &[(String, Vec<usize>)],
) {
    assert_eq!(
        params.len(),
        grads.len(),
        "{name}: params and grads differ in length"
    );
    for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
        assert_eq!(
            g.shape(p),
            g.shape(gr),
            "{name}: grad {k} does not match its parameter"
        );
    }
    assert_eq!(
        state.len(),
        specs.len(),
        "{name}: expected {} state tensors",
        specs.len()
    );
    for (id, (n, s)) in state.iter().zip(specs) {
        assert_eq!(
            g.shape(*id),
            s.as_slice(),
            "{name}: state {n} has the wrong shape"
        );
    }
}

fn shapes_of(g: &Graph, params: &[NodeId]) -> Vec<Vec<usize>> {
    params.iter().map(|&p| g.shape(p).to_vec()).collect()
}

/// The rules of a state whose every tensor is a constant (the baselines').
pub fn constant_rules(state: Vec<(String, Tensor)>) -> anyhow::Result<Vec<TensorInit>> {
    state
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .as_f32()
                .ok_or_else(|| anyhow::anyhow!("optimizer state '{n}' is not f32"))?;
            let value = v.first().copied().unwrap_or(0.0);
            anyhow::ensure!(
                v.iter().all(|x| x.to_bits() == value.to_bits()),
                "optimizer state '{n}' does not start constant"
            );
            Ok(TensorInit::new(&n, &t.shape, InitRule::Constant { value }))
        })
        .collect()
}

// ---- Adam -------------------------------------------------------------------

/// Adam (Kingma & Ba), the PyTorch / TF `Adam` form with bias correction:
///
/// ```text
/// t' = t + 1
/// m' = b1 m + (1 - b1) g
/// v' = b2 v + (1 - b2) g^2
/// theta' = theta - lr * (m' / (1 - b1^t')) / (sqrt(v' / (1 - b2^t')) + eps)
/// ```
///
/// State: `adam.p{k}.m`, `adam.p{k}.v` (parameter shapes, start at 0), then
/// the scalar step count `adam.t` (f32, starts at 0; exact up to 2^24 steps).
/// `eps` is added outside the square root of the bias-corrected `v`.
///
/// With `scaled_lr`, the step also reads a scalar graph input
/// [`LR_SCALE`] that multiplies `lr` (a schedule the host drives).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub scaled_lr: bool,
}

/// The learning-rate multiplier input of an Adam step with `scaled_lr`.
pub const LR_SCALE: &str = "lr_scale";

impl Default for Adam {
    fn default() -> Self {
        Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            scaled_lr: false,
        }
    }
}

impl Adam {
    pub fn with_lr(lr: f32) -> Self {
        Adam {
            lr,
            ..Self::default()
        }
    }
}

impl StepOptimizer for Adam {
    fn name(&self) -> &'static str {
        "adam"
    }
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        for (k, s) in param_shapes.iter().enumerate() {
            v.push((format!("adam.p{k}.m"), s.clone()));
            v.push((format!("adam.p{k}.v"), s.clone()));
        }
        v.push(("adam.t".into(), vec![]));
        v
    }
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)> {
        filled(self.state_specs(param_shapes), |_| 0.0)
    }
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let lr_scale = self.scaled_lr.then_some(LR_SCALE);
        self.step_scaled(g, params, grads, state, lr_scale)
    }
}

impl Adam {
    /// [`StepOptimizer::step`] with the learning rate's multiplier read from
    /// the scalar graph input named `lr_scale` (`None`: no multiplier), so
    /// that several Adams can live in one graph, each with its own
    /// multiplier (`scaled_lr` is not read).
    pub fn step_scaled(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
        lr_scale: Option<&str>,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let specs = self.state_specs(&shapes_of(g, params));
        check("Adam", g, params, grads, state, &specs);
        let t = g.add_scalar(state[state.len() - 1], 1.0);
        let one = g.scalar(1.0);
        let b1 = g.scalar(self.beta1);
        let b2 = g.scalar(self.beta2);
        let b1t = g.pow(b1, t);
        let b2t = g.pow(b2, t);
        let bc1 = g.sub(one, b1t);
        let bc2 = g.sub(one, b2t);
        let lr_scale = lr_scale.map(|name| g.input(name, metac_graphs::DType::F32, &[]));
        let (mut new_p, mut new_s) = (vec![], vec![]);
        for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
            let (m, v) = (state[2 * k], state[2 * k + 1]);
            let a = g.mul_scalar(m, self.beta1);
            let b = g.mul_scalar(gr, 1.0 - self.beta1);
            let m2 = g.add(a, b);
            let a = g.mul_scalar(v, self.beta2);
            let g2 = g.square(gr);
            let b = g.mul_scalar(g2, 1.0 - self.beta2);
            let v2 = g.add(a, b);
            let mhat = g.div(m2, bc1);
            let vhat = g.div(v2, bc2);
            let den = g.sqrt(vhat);
            let den = g.add_scalar(den, self.eps);
            let q = g.div(mhat, den);
            let q = match lr_scale {
                Some(s) => g.mul(q, s),
                None => q,
            };
            let upd = g.mul_scalar(q, self.lr);
            new_p.push(g.sub(p, upd));
            new_s.push(m2);
            new_s.push(v2);
        }
        new_s.push(t);
        (new_p, new_s)
    }
}

// ---- SGD with momentum --------------------------------------------------------

/// SGD with (heavy-ball) momentum, the PyTorch / TF1 `MomentumOptimizer`
/// form without dampening:
///
/// ```text
/// buf' = momentum * buf + g
/// theta' = theta - lr * buf'
/// ```
///
/// With `momentum == 0` this is plain SGD and has no state; otherwise the
/// state is `sgd.p{k}.buf` (parameter shapes, starts at 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd {
            lr: 1e-3,
            momentum: 0.0,
        }
    }
}

impl StepOptimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        if self.momentum == 0.0 {
            return vec![];
        }
        per_param("sgd", "buf", param_shapes)
    }
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)> {
        filled(self.state_specs(param_shapes), |_| 0.0)
    }
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let specs = self.state_specs(&shapes_of(g, params));
        check("Sgd", g, params, grads, state, &specs);
        let (mut new_p, mut new_s) = (vec![], vec![]);
        for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
            let dir = if self.momentum == 0.0 {
                gr
            } else {
                let a = g.mul_scalar(state[k], self.momentum);
                let b = g.add(a, gr);
                new_s.push(b);
                b
            };
            let upd = g.mul_scalar(dir, self.lr);
            new_p.push(g.sub(p, upd));
        }
        (new_p, new_s)
    }
}

// ---- RMSProp ------------------------------------------------------------------

/// RMSProp, the TF1 `RMSPropOptimizer` form (no momentum, not centred), with
/// `eps` inside the square root:
///
/// ```text
/// ms' = decay * ms + (1 - decay) * g^2
/// theta' = theta - lr * g / sqrt(ms' + eps)
/// ```
///
/// Defaults: decay 0.9, eps 1e-10 (TF1's defaults), accumulator starting at
/// `initial_ms = 0` (PyTorch / Keras; TF1 started it at 1, which makes the
/// first steps tiny; set `initial_ms: 1.0` to reproduce TF1, e.g. the
/// original meta-optimizer). State: `rmsprop.p{k}.ms` (parameter shapes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsProp {
    pub lr: f32,
    pub decay: f32,
    pub eps: f32,
    pub initial_ms: f32,
}

impl Default for RmsProp {
    fn default() -> Self {
        RmsProp {
            lr: 1e-3,
            decay: 0.9,
            eps: 1e-10,
            initial_ms: 0.0,
        }
    }
}

impl StepOptimizer for RmsProp {
    fn name(&self) -> &'static str {
        "rmsprop"
    }
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        per_param("rmsprop", "ms", param_shapes)
    }
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)> {
        filled(self.state_specs(param_shapes), |_| self.initial_ms)
    }
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let specs = self.state_specs(&shapes_of(g, params));
        check("RmsProp", g, params, grads, state, &specs);
        let (mut new_p, mut new_s) = (vec![], vec![]);
        for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
            let a = g.mul_scalar(state[k], self.decay);
            let g2 = g.square(gr);
            let b = g.mul_scalar(g2, 1.0 - self.decay);
            let ms = g.add(a, b);
            let den = g.add_scalar(ms, self.eps);
            let den = g.sqrt(den);
            let q = g.div(gr, den);
            let upd = g.mul_scalar(q, self.lr);
            new_p.push(g.sub(p, upd));
            new_s.push(ms);
        }
        (new_p, new_s)
    }
}

// ---- Adagrad ------------------------------------------------------------------

/// Adagrad, accumulator started at `initial_accumulator` (0.1, TF1's default)
/// and `eps` outside the square root (PyTorch's form, eps 1e-10; TF1 has no
/// eps, which its positive initial accumulator makes unnecessary):
///
/// ```text
/// acc' = acc + g^2
/// theta' = theta - lr * g / (sqrt(acc') + eps)
/// ```
///
/// State: `adagrad.p{k}.accum` (parameter shapes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adagrad {
    pub lr: f32,
    pub initial_accumulator: f32,
    pub eps: f32,
}

impl Default for Adagrad {
    fn default() -> Self {
        Adagrad {
            lr: 1e-2,
            initial_accumulator: 0.1,
            eps: 1e-10,
        }
    }
}

impl StepOptimizer for Adagrad {
    fn name(&self) -> &'static str {
        "adagrad"
    }
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        per_param("adagrad", "accum", param_shapes)
    }
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)> {
        filled(self.state_specs(param_shapes), |_| self.initial_accumulator)
    }
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let specs = self.state_specs(&shapes_of(g, params));
        check("Adagrad", g, params, grads, state, &specs);
        let (mut new_p, mut new_s) = (vec![], vec![]);
        for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
            let g2 = g.square(gr);
            let acc = g.add(state[k], g2);
            let den = g.sqrt(acc);
            let den = g.add_scalar(den, self.eps);
            let q = g.div(gr, den);
            let upd = g.mul_scalar(q, self.lr);
            new_p.push(g.sub(p, upd));
            new_s.push(acc);
        }
        (new_p, new_s)
    }
}

/// The baselines every L2O bundle holds a compiled step of, for its
/// training problem (`metac eval`'s default comparison).
pub const BUNDLE_BASELINES: [&str; 5] = [
    "adam-1e-3",
    "adam-1e-4",
    "sgd-1e-3",
    "rmsprop-1e-3",
    "adagrad-1e-2",
];

/// Parses a baseline label `NAME-LR` (e.g. `adam-1e-3`) with NAME one of
/// adam, sgd, rmsprop, adagrad; the other hyperparameters are the defaults.
pub fn parse_baseline(s: &str) -> Result<Baseline, String> {
    let bad = || {
        format!(
            "unknown optimizer '{s}' (expected learned or NAME-LR with NAME one of adam, sgd, rmsprop, adagrad, e.g. adam-1e-3)"
        )
    };
    let (name, lr) = s.split_once('-').ok_or_else(bad)?;
    let lr: f32 = lr.parse().map_err(|_| bad())?;
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!(
            "optimizer '{s}': the learning rate must be a finite number > 0"
        ));
    }
    Ok(match name {
        "adam" => Baseline::Adam(Adam::with_lr(lr)),
        "sgd" => Baseline::Sgd(Sgd {
            lr,
            ..Sgd::default()
        }),
        "rmsprop" => Baseline::RmsProp(RmsProp {
            lr,
            ..RmsProp::default()
        }),
        "adagrad" => Baseline::Adagrad(Adagrad {
            lr,
            ..Adagrad::default()
        }),
        _ => return Err(bad()),
    })
}

/// Any of the baselines, for choosing one at run time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Baseline {
    Adam(Adam),
    Sgd(Sgd),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
}

impl Baseline {
    fn inner(&self) -> &dyn StepOptimizer {
        match self {
            Baseline::Adam(o) => o,
            Baseline::Sgd(o) => o,
            Baseline::RmsProp(o) => o,
            Baseline::Adagrad(o) => o,
        }
    }
}

impl StepOptimizer for Baseline {
    fn name(&self) -> &'static str {
        self.inner().name()
    }
    fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        self.inner().state_specs(param_shapes)
    }
    fn initial_state(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Tensor)> {
        self.inner().initial_state(param_shapes)
    }
    fn step(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        self.inner().step(g, params, grads, state)
    }
}
