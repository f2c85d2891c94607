//! Truncated backpropagation through time from explicit step adjoints.
//!
//! An L2O bundle holds one inner step `step(phi, theta_t, S_t, batch_t) ->
//! (theta_t+1, S_t+1)`, its VJP, and `objective_chunk`, which measures the
//! objective and its gradient at several `theta_t+1` at once.
//! [`truncated_bptt`] runs one unroll in three parts: `forward` runs the
//! steps, keeping only `(theta_t, S_t)` and the objective's gradient per
//! step (memory grows with the optimizee and optimizer state, not with
//! activations); the meta-loss terms ([`MetaLossTerm`]: the log objective,
//! the regulariser, imitation) give the meta-loss and their cotangents;
//! `backward` runs the VJP graph from the last step to the first, carrying
//! the cotangents of `theta` and `S` and summing the cotangent of `phi`. A
//! [`StepRunner`] runs the graphs by [`Role`].
//!
//! The log-objective term is the `use_log_objective` form of the original code:
//! `mean_t log(obj_t / (initial_obj + 1e-6) + 1e-6)`, with `obj_t` the
//! objective after step `t` and `initial_obj` a constant. Its cotangent
//! (see [`meta_loss_term`]) enters the backward pass through theta:
//! `ct theta_t+1 += d term / d obj_t * grad objective_t`. The objective's
//! gradient comes from the forward step, which has the objective set's
//! activations at hand, so the VJP never touches the (large) objective set.
//! Gradients are truncated at the unroll boundary: the `theta` and `S` the
//! unroll starts from are constants.
//!
//! The driver is generic over [`StepRunner`], so it runs on backend
//! [`Session`]s ([`SessionRunner`], f32) and on the f64 reference interpreter
//! ([`GraphRunner`], the ground truth of the tests).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::Graph;
use ndarray::{ArrayD, IxDyn};

use super::REG;
use super::{
    chunk_name, ct_name, d_name, next_name, objective_grad_name, L2oLayout, MINIBATCH_LOSS,
    OBJECTIVE, OBJECTIVE_CHUNK, STEP_UNREGULARIZED, STEP_VJP_UNREGULARIZED,
};
use crate::backend::{Backend, Session};
use crate::tensor::HostTensor;
use metac_contract::bundle::Bundle;

pub use crate::tensor::Named;

/// The host arithmetic BPTT needs on a runner's tensor type.
pub trait StepTensor: Clone {
    /// A rank-0 float tensor.
    fn scalar(v: f64) -> Self;
    /// The value of a one-element float tensor.
    fn scalar_value(&self) -> Result<f64>;
    /// A float tensor of zeros shaped like `self`.
    fn zeros_like(&self) -> Self;
    /// Elementwise sum of two float tensors of one shape.
    fn add(&self, other: &Self) -> Result<Self>;
    /// `self + a * x`, elementwise, for float tensors of one shape.
    fn axpy(&self, a: f64, x: &Self) -> Result<Self>;
    /// `sum(self * x)` of float tensors of one shape.
    fn dot(&self, x: &Self) -> Result<f64>;
    /// Number of elements.
    fn num_elements(&self) -> usize;
    /// The transpose of a 2-D float tensor (contiguous).
    fn transposed(&self) -> Result<Self>;
}

/// The transposed copies of the objective set that the layout asks for
/// (`obj.x.T` of a row-major objective, made once per objective set, so that
/// the objective's gradient `X^T dH` is a plain MatMul) and that `obj` does
/// not hold already (a data source may make them more cheaply itself). The
/// objective graph reads them next to the objective set.
pub fn objective_transposes<T: StepTensor>(
    layout: &L2oLayout,
    obj: &[(String, T)],
) -> Result<Named<T>> {
    layout
        .objective_transposed
        .iter()
        .filter(|(name, _)| !obj.iter().any(|(n, _)| n == name))
        .map(|(name, src)| {
            let x = obj
                .iter()
                .find(|(n, _)| n == src)
                .with_context(|| format!("objective set has no '{src}' to transpose"))?;
            Ok((name.clone(), x.1.transposed()?))
        })
        .collect()
}

impl StepTensor for HostTensor {
    fn scalar(v: f64) -> Self {
        HostTensor::scalar_f32(v as f32)
    }
    fn scalar_value(&self) -> Result<f64> {
        Ok(f64::from(self.to_scalar_f32()?))
    }
    fn zeros_like(&self) -> Self {
        HostTensor::zeros(self.dtype(), self.shape())
    }
    fn add(&self, other: &Self) -> Result<Self> {
        let (a, b) = (self.as_f32()?, other.as_f32()?);
        ensure!(
            a.shape() == b.shape(),
            "adding f32 tensors of shapes {:?} and {:?}",
            a.shape(),
            b.shape()
        );
        Ok(HostTensor::F32(a + b))
    }
    fn axpy(&self, a: f64, x: &Self) -> Result<Self> {
        let (y, x) = (self.as_f32()?, x.as_f32()?);
        ensure!(
            y.shape() == x.shape(),
            "axpy on f32 tensors of shapes {:?} and {:?}",
            y.shape(),
            x.shape()
        );
        let a = a as f32;
        Ok(HostTensor::F32(
            ndarray::Zip::from(y).and(x).map_collect(|&y, &x| y + a * x),
        ))
    }
    fn dot(&self, x: &Self) -> Result<f64> {
        let (y, x) = (self.as_f32()?, x.as_f32()?);
        ensure!(
            y.shape() == x.shape(),
            "dot of f32 tensors of shapes {:?} and {:?}",
            y.shape(),
            x.shape()
        );
        Ok(y.iter()
            .zip(x)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum())
    }
    fn num_elements(&self) -> usize {
        self.shape().iter().product()
    }
    fn transposed(&self) -> Result<Self> {
        let a = self.as_f32()?;
        ensure!(
            a.ndim() == 2,
            "transposing a tensor of shape {:?}",
            a.shape()
        );
        let (rows, cols) = (a.shape()[0], a.shape()[1]);
        let t = match a.as_slice() {
            Some(src) => crate::tensor::transpose_2d(src, rows, cols),
            None => a.t().iter().copied().collect(),
        };
        Ok(HostTensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[cols, rows]), t).expect("transposed shape"),
        ))
    }
}

impl StepTensor for Value {
    fn scalar(v: f64) -> Self {
        Value::F(ArrayD::from_elem(IxDyn(&[]), v))
    }
    fn scalar_value(&self) -> Result<f64> {
        match self {
            Value::F(a) if a.len() == 1 => Ok(*a.iter().next().expect("one element")),
            other => bail!(
                "expected a one-element float value, got shape {:?}",
                other.shape()
            ),
        }
    }
    fn zeros_like(&self) -> Self {
        Value::F(ArrayD::zeros(IxDyn(self.shape())))
    }
    fn add(&self, other: &Self) -> Result<Self> {
        match (self, other) {
            (Value::F(a), Value::F(b)) if a.shape() == b.shape() => Ok(Value::F(a + b)),
            _ => bail!(
                "adding values of shapes {:?} and {:?} (floats of one shape expected)",
                self.shape(),
                other.shape()
            ),
        }
    }
    fn axpy(&self, a: f64, x: &Self) -> Result<Self> {
        match (self, x) {
            (Value::F(y), Value::F(x)) if y.shape() == x.shape() => Ok(Value::F(y + &(x * a))),
            _ => bail!(
                "axpy on values of shapes {:?} and {:?} (floats of one shape expected)",
                self.shape(),
                x.shape()
            ),
        }
    }
    fn dot(&self, x: &Self) -> Result<f64> {
        match (self, x) {
            (Value::F(y), Value::F(x)) if y.shape() == x.shape() => {
                Ok(y.iter().zip(x).map(|(a, b)| a * b).sum())
            }
            _ => bail!(
                "dot of values of shapes {:?} and {:?} (floats of one shape expected)",
                self.shape(),
                x.shape()
            ),
        }
    }
    fn num_elements(&self) -> usize {
        self.shape().iter().product()
    }
    fn transposed(&self) -> Result<Self> {
        match self {
            Value::F(a) if a.ndim() == 2 => Ok(Value::F(a.t().as_standard_layout().into_owned())),
            _ => bail!("transposing a value of shape {:?}", self.shape()),
        }
    }
}

/// The graphs of an L2O bundle that BPTT runs, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `step`: phi, theta, S, minibatch (and probes) -> `next.*`,
    /// `minibatch_loss` (and `reg`).
    Step,
    /// `step_vjp`: the step's inputs and `ct.next.*` (and `ct.reg`) -> `d.*`.
    StepVjp,
    /// `objective_chunk`: `t<k>.theta.*`, the objective set ->
    /// `t<k>.objective`, `t<k>.objective_grad.*`.
    ObjectiveChunk,
    /// `reset`: phi -> `next.<hidden state>`.
    Reset,
    /// `reset_vjp`: phi, `ct.next.<hidden state>` -> `d.<phi>` (the init
    /// vectors).
    ResetVjp,
}

impl Role {
    /// The bundle graph of the role (with the regulariser, where a bundle
    /// has both forms).
    pub fn graph(self) -> &'static str {
        match self {
            Role::Step => "step",
            Role::StepVjp => "step_vjp",
            Role::ObjectiveChunk => OBJECTIVE_CHUNK,
            Role::Reset => "reset",
            Role::ResetVjp => "reset_vjp",
        }
    }

    /// The graph without the regulariser, for the roles that have one.
    fn unregularized(self) -> Option<&'static str> {
        match self {
            Role::Step => Some(STEP_UNREGULARIZED),
            Role::StepVjp => Some(STEP_VJP_UNREGULARIZED),
            _ => None,
        }
    }

    pub const ALL: [Role; 5] = [
        Role::Step,
        Role::StepVjp,
        Role::ObjectiveChunk,
        Role::Reset,
        Role::ResetVjp,
    ];
}

/// Runs the graphs of an L2O bundle by role. Inputs may include names a
/// graph does not declare (implementations pass each graph only its own
/// inputs); outputs come back by name.
pub trait StepRunner {
    type Tensor: StepTensor;
    /// Run the graph of `role`.
    fn run(&mut self, role: Role, inputs: &[(&str, &Self::Tensor)]) -> Result<Named<Self::Tensor>>;
    /// Whether `step` measures the regulariser and whether `step_vjp`
    /// differentiates it. A runner that has the graphs without it
    /// ([`super::STEP_UNREGULARIZED`]) runs those where the answer is no; the
    /// others ignore this (an uncounted regulariser then gets a zero
    /// cotangent: the same meta-gradient, computed more slowly).
    fn set_regularized(&mut self, _measure: bool, _differentiate: bool) {}
}

/// One unroll's inputs.
pub struct Unroll<'a, T> {
    /// Meta-parameters, any order, by name.
    pub phi: &'a [(String, T)],
    /// Optimizee parameters at the start of the unroll.
    pub theta: &'a [(String, T)],
    /// Optimizer state at the start of the unroll.
    pub state: &'a [(String, T)],
    /// Reset the hidden states from `phi` in-graph before the first step (the
    /// first unroll of a problem), so the initial-state vectors get gradients.
    pub reset: bool,
    /// One minibatch per step (`batch.*` names); the unroll length is its length.
    pub minibatches: &'a dyn Minibatches<T>,
    /// The objective set (`obj.*` names), fixed for the unroll.
    pub objective_batch: &'a [(String, T)],
    /// The constant the objectives are measured against.
    pub initial_objective: f64,
    /// The regulariser's probes (`reg.probe.*`), one set per step, or empty
    /// (no regulariser, or one without probes).
    pub probes: &'a [Named<T>],
    /// Weight of the regulariser in this unroll's meta-loss (0: not counted).
    pub reg_weight: f64,
    /// Imitation labels (Adam's update per step, by theta name) and the
    /// weight of the MSE term, on imitating meta-iterations.
    pub imitation: Option<(&'a [Named<T>], f64)>,
    /// Keep `(theta_t, S_t)` only for every this-many-th step and recompute
    /// the others in the backward pass (one more forward step per step, for
    /// memory that grows with `steps / every + every` states instead of
    /// `steps`); 0 or 1 keeps every step.
    pub checkpoint_every: usize,
}

impl<T> Unroll<'_, T> {
    /// The probes of step `t` (none without a regulariser).
    fn probes_at(&self, t: usize) -> &[(String, T)] {
        self.probes.get(t).map_or(&[], |p| p.as_slice())
    }
}

/// What an unroll produced.
#[derive(Clone, Debug)]
pub struct BpttResult<T> {
    /// The unroll's meta-loss over the steps run: the log objective
    /// `mean_t log(obj_t / (initial_obj + 1e-6) + 1e-6)`, plus `reg_weight *
    /// sum_t reg_t` with a regulariser and the imitation MSE term when
    /// imitating (the terms of [`MetaLossTerm`]).
    pub meta_loss: f64,
    /// d meta-loss / d phi, in the order of `layout.phi`.
    pub d_phi: Named<T>,
    /// theta after the last finite step (the next unroll starts here).
    pub theta: Named<T>,
    /// S after the last finite step.
    pub state: Named<T>,
    /// Objective after each step run.
    pub objectives: Vec<f64>,
    /// Minibatch loss at the start of each step run.
    pub minibatch_losses: Vec<f64>,
    /// The regulariser at the start of each step run (empty without one).
    pub regs: Vec<f64>,
    /// The imitation MSE of each step run (empty without imitation).
    pub imitation_mse: Vec<f64>,
    /// The unroll stopped at a non-finite objective; only the steps before
    /// it count (the meta-loss is 0 and d_phi zero if none ran).
    pub diverged: bool,
}

/// The epsilon of the log objective, rounded to f32 as in the graphs.
fn eps() -> f64 {
    f64::from(1e-6_f32)
}

/// One term of the log meta-objective and its derivative in `obj`:
/// `log(obj / (initial + 1e-6) + 1e-6)`.
pub fn meta_loss_term(obj: f64, initial: f64) -> (f64, f64) {
    let c = initial + eps();
    let r = obj / c + eps();
    (r.ln(), 1.0 / (r * c))
}

fn lookup<'o, T>(out: &'o HashMap<String, T>, graph: &str, name: &str) -> Result<&'o T> {
    out.get(name)
        .with_context(|| format!("graph '{graph}' has no output '{name}'"))
}

/// An output taken out of a graph's outputs (no copy).
fn take<T>(out: &mut HashMap<String, T>, graph: &str, name: &str) -> Result<T> {
    out.remove(name)
        .with_context(|| format!("graph '{graph}' has no output '{name}'"))
}

fn pick<T: Clone>(from: &[(String, T)], names: &[String], what: &str) -> Result<Named<T>> {
    let map: HashMap<&str, &T> = from.iter().map(|(n, t)| (n.as_str(), t)).collect();
    names
        .iter()
        .map(|n| {
            map.get(n.as_str())
                .map(|t| (n.clone(), (*t).clone()))
                .with_context(|| format!("{what}: missing '{n}'"))
        })
        .collect()
}

/// `(theta_t, S_t)`.
type ThetaState<T> = (Named<T>, Named<T>);

/// The minibatches of an unroll, one per step, made when a step needs them
/// (a long unroll need not hold all of its minibatches at once).
pub trait Minibatches<T: Clone> {
    /// Number of steps.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The minibatch (`batch.*`) of step `t`.
    fn get(&self, t: usize) -> Result<std::borrow::Cow<'_, Named<T>>>;
}

impl<T: Clone> Minibatches<T> for Vec<Named<T>> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn get(&self, t: usize) -> Result<std::borrow::Cow<'_, Named<T>>> {
        self.as_slice()
            .get(t)
            .map(std::borrow::Cow::Borrowed)
            .with_context(|| format!("no minibatch for step {t}"))
    }
}

/// One `step` run: its inputs from the pieces, its outputs by name.
#[allow(clippy::too_many_arguments)]
fn run_step<R: StepRunner>(
    runner: &mut R,
    phi: &Named<R::Tensor>,
    theta: &Named<R::Tensor>,
    state: &Named<R::Tensor>,
    minibatch: &Named<R::Tensor>,
    probes: &[(String, R::Tensor)],
) -> Result<HashMap<String, R::Tensor>> {
    let ins: Vec<(&str, &R::Tensor)> = phi
        .iter()
        .chain(theta)
        .chain(state)
        .chain(minibatch)
        .chain(probes)
        .map(|(n, x)| (n.as_str(), x))
        .collect();
    Ok(runner.run(Role::Step, &ins)?.into_iter().collect())
}

/// `names` looked up as `next.<name>` in a step's outputs, taken out of them
/// (no copy).
fn next_of<T>(out: &mut HashMap<String, T>, names: &[String]) -> Result<Named<T>> {
    names
        .iter()
        .map(|n| Ok((n.clone(), take(out, "step", &next_name(n))?)))
        .collect()
}

/// What an unroll's forward pass keeps for the meta-loss and the backward
/// pass.
struct Forward<T> {
    /// `phi` in layout order.
    phi: Named<T>,
    /// `(theta_t, S_t)` of every `checkpoint_every`-th step.
    checkpoints: Vec<ThetaState<T>>,
    /// d objective_t / d theta_t+1 of every step that counts.
    objective_grads: Vec<Vec<T>>,
    objectives: Vec<f64>,
    minibatch_losses: Vec<f64>,
    regs: Vec<f64>,
    /// Imitation residuals `r_t = Delta_t - label_t` and `0.5 |r_t|^2`.
    residuals: Vec<Vec<T>>,
    squares: Vec<f64>,
    /// Where the unroll ended (the last finite step's result).
    theta: Named<T>,
    state: Named<T>,
    diverged: bool,
}

/// The forward pass of an unroll: `reset` (on a first unroll), then
/// `step` in chunks of `objective_chunk`, each chunk's objectives measured
/// in one `objective_chunk` run. A non-finite objective (or regulariser)
/// ends the unroll at that step: the steps before it count, and the
/// unroll's result is the parameters and state that step started from.
fn forward<R: StepRunner>(
    runner: &mut R,
    layout: &L2oLayout,
    u: &Unroll<'_, R::Tensor>,
) -> Result<Forward<R::Tensor>> {
    type T<R> = <R as StepRunner>::Tensor;
    let phi = pick(u.phi, &layout.phi, "phi")?;
    // The set itself is borrowed; only its transposes are made here.
    let transposes = objective_transposes(layout, u.objective_batch)?;
    let objective_batch = (u.objective_batch, transposes.as_slice());
    let theta0 = pick(u.theta, &layout.theta, "theta")?;
    let mut state0 = pick(u.state, &layout.state, "state")?;

    if u.reset {
        let ins: Vec<(&str, &T<R>)> = phi.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let out: HashMap<String, T<R>> = runner.run(Role::Reset, &ins)?.into_iter().collect();
        for (n, t) in state0.iter_mut() {
            if layout.hidden.contains(n) {
                *t = lookup(&out, "reset", &next_name(n))?.clone();
            }
        }
    }
    ensure!(
        u.probes.is_empty() || u.probes.len() == u.minibatches.len(),
        "{} probe sets for an unroll of {} steps",
        u.probes.len(),
        u.minibatches.len()
    );
    if let Some((labels, _)) = u.imitation {
        ensure!(
            labels.len() >= u.minibatches.len(),
            "{} imitation labels for {} steps",
            labels.len(),
            u.minibatches.len()
        );
    }
    // The regulariser is always measured (logged, and a non-finite one ends
    // the unroll), but differentiated only when this unroll counts it: its
    // third-order terms are most of its cost.
    runner.set_regularized(true, u.reg_weight != 0.0);
    let every = u.checkpoint_every.max(1);
    let chunk = layout.objective_chunk;
    ensure!(
        chunk > 0,
        "the bundle has no 'objective_chunk' graph (compiled by an older metac): recompile it with `metac compile l2o`"
    );
    let chunk_inputs: Vec<Vec<String>> = (0..chunk)
        .map(|k| layout.theta.iter().map(|n| chunk_name(k, n)).collect())
        .collect();
    let mut f = Forward {
        phi,
        checkpoints: vec![],
        objective_grads: vec![],
        objectives: vec![],
        minibatch_losses: vec![],
        regs: vec![],
        residuals: vec![],
        squares: vec![],
        theta: theta0,
        state: state0,
        diverged: false,
    };
    let n = u.minibatches.len();
    let mut t = 0;
    while t < n && !f.diverged {
        // (theta_t, S_t) and theta_t+1 of each step of the chunk.
        let mut starts: Vec<ThetaState<T<R>>> = vec![];
        let mut after: Vec<Named<T<R>>> = vec![];
        while t < n && starts.len() < chunk {
            let mb = u.minibatches.get(t)?;
            let mut out = run_step(runner, &f.phi, &f.theta, &f.state, &mb, u.probes_at(t))?;
            let reg = out.get(REG).map(|r| r.scalar_value()).transpose()?;
            if reg.is_some_and(|r| !r.is_finite()) {
                f.diverged = true;
                break;
            }
            f.regs.extend(reg);
            f.minibatch_losses
                .push(lookup(&out, "step", MINIBATCH_LOSS)?.scalar_value()?);
            let next_theta = next_of(&mut out, &layout.theta)?;
            let next_state = next_of(&mut out, &layout.state)?;
            if let Some((labels, _)) = u.imitation {
                let label: HashMap<&str, &T<R>> =
                    labels[t].iter().map(|(n, x)| (n.as_str(), x)).collect();
                let mut rs = vec![];
                let mut ss = 0.0;
                for ((n, next), (_, cur)) in next_theta.iter().zip(&f.theta) {
                    let l = label
                        .get(n.as_str())
                        .with_context(|| format!("imitation label of step {t} has no '{n}'"))?;
                    let r = next.axpy(-1.0, cur)?.axpy(-1.0, l)?;
                    ss += r.dot(&r)?;
                    rs.push(r);
                }
                f.residuals.push(rs);
                f.squares.push(0.5 * ss);
            }
            after.push(next_theta.clone());
            starts.push((
                std::mem::replace(&mut f.theta, next_theta),
                std::mem::replace(&mut f.state, next_state),
            ));
            t += 1;
        }
        if starts.is_empty() {
            break;
        }
        // The objective after each step; a short last chunk repeats its last
        // parameters.
        let mut ins: Vec<(&str, &T<R>)> = objective_batch
            .0
            .iter()
            .chain(objective_batch.1)
            .map(|(n, x)| (n.as_str(), x))
            .collect();
        for (k, names) in chunk_inputs.iter().enumerate() {
            let th = &after[k.min(after.len() - 1)];
            ins.extend(
                names
                    .iter()
                    .map(|n| n.as_str())
                    .zip(th.iter().map(|(_, x)| x)),
            );
        }
        let mut out: HashMap<String, T<R>> = runner
            .run(Role::ObjectiveChunk, &ins)?
            .into_iter()
            .collect();
        let first = t - starts.len();
        for (k, start) in starts.into_iter().enumerate() {
            let obj = lookup(&out, OBJECTIVE_CHUNK, &chunk_name(k, OBJECTIVE))?.scalar_value()?;
            if !obj.is_finite() {
                // Back to where this step started; later steps do not count.
                f.diverged = true;
                (f.theta, f.state) = start;
                break;
            }
            f.objectives.push(obj);
            f.objective_grads.push(
                layout
                    .theta
                    .iter()
                    .map(|n| {
                        take(
                            &mut out,
                            OBJECTIVE_CHUNK,
                            &chunk_name(k, &objective_grad_name(n)),
                        )
                    })
                    .collect::<Result<_>>()?,
            );
            if (first + k).is_multiple_of(every) {
                f.checkpoints.push(start);
            }
        }
    }
    // Only the steps whose objective was finite count.
    let steps = f.objectives.len();
    f.minibatch_losses.truncate(steps);
    f.regs.truncate(steps);
    f.residuals.truncate(steps);
    f.squares.truncate(steps);
    Ok(f)
}

/// One term of an unroll's meta-loss: its value, and its cotangents in the
/// backward pass, which reach the step either through `theta` (added to
/// `ct theta_t+1` before step `t`'s VJP, or to `ct theta_t` after it, for a
/// term that reads `theta_t` itself) or as a cotangent input of the VJP
/// graph (`ct.reg`).
pub trait MetaLossTerm<T: StepTensor> {
    /// Add the term's value to the running meta-loss.
    fn add_value(&self, meta_loss: &mut f64);
    /// Before step `t`'s VJP: add to the cotangent of `theta_t+1`.
    fn before_vjp(&self, _t: usize, _ct_theta: &mut [T]) -> Result<()> {
        Ok(())
    }
    /// After step `t`'s VJP: add to the cotangent of `theta_t`.
    fn after_vjp(&self, _t: usize, _ct_theta: &mut [T]) -> Result<()> {
        Ok(())
    }
    /// Cotangent inputs of the VJP graph.
    fn vjp_inputs(&self) -> Named<T> {
        vec![]
    }
}

/// The log meta-objective `mean_t log(obj_t / (initial_obj + 1e-6) + 1e-6)`:
/// its cotangent enters through `theta_t+1` (the objective after step `t`
/// is a function of `theta_t+1` only), times the objective's gradient that
/// `objective_chunk` returned.
struct LogObjective<'f, T> {
    values: Vec<f64>,
    d_obj: Vec<f64>,
    grads: &'f [Vec<T>],
}

impl<'f, T: StepTensor> LogObjective<'f, T> {
    fn new(objectives: &[f64], grads: &'f [Vec<T>], initial: f64) -> Self {
        let steps = objectives.len() as f64;
        let (values, d_obj) = objectives
            .iter()
            .map(|&o| {
                let (v, d) = meta_loss_term(o, initial);
                (v / steps, d / steps)
            })
            .unzip();
        LogObjective {
            values,
            d_obj,
            grads,
        }
    }
}

impl<T: StepTensor> MetaLossTerm<T> for LogObjective<'_, T> {
    fn add_value(&self, meta_loss: &mut f64) {
        for v in &self.values {
            *meta_loss += v;
        }
    }
    fn before_vjp(&self, t: usize, ct_theta: &mut [T]) -> Result<()> {
        for (ct, g) in ct_theta.iter_mut().zip(&self.grads[t]) {
            *ct = ct.axpy(self.d_obj[t], g)?;
        }
        Ok(())
    }
}

/// The Hessian regulariser, `weight * sum_t reg_t` (a sum, as the fork's
/// `regular += alpha * reg`): the step graphs differentiate it, fed the
/// cotangent `ct.reg = weight`.
struct Regularizer {
    weight: f64,
    sum: f64,
}

impl<T: StepTensor> MetaLossTerm<T> for Regularizer {
    fn add_value(&self, meta_loss: &mut f64) {
        *meta_loss += self.weight * self.sum;
    }
    fn vjp_inputs(&self) -> Named<T> {
        vec![(ct_name(REG), T::scalar(self.weight))]
    }
}

/// Imitation of Adam, `weight * mean_t 0.5 |r_t|^2 / P` with `r_t =
/// theta_t+1 - theta_t - label_t`; its adjoint is `c r_t` in `theta_t+1`
/// and `-c r_t` in `theta_t`, `c = weight / (steps P)`.
struct Imitation<'f, T> {
    residuals: &'f [Vec<T>],
    c: f64,
    value: f64,
}

impl<T: StepTensor> MetaLossTerm<T> for Imitation<'_, T> {
    fn add_value(&self, meta_loss: &mut f64) {
        *meta_loss += self.value;
    }
    fn before_vjp(&self, t: usize, ct_theta: &mut [T]) -> Result<()> {
        for (ct, r) in ct_theta.iter_mut().zip(&self.residuals[t]) {
            *ct = ct.axpy(self.c, r)?;
        }
        Ok(())
    }
    fn after_vjp(&self, t: usize, ct_theta: &mut [T]) -> Result<()> {
        for (ct, r) in ct_theta.iter_mut().zip(&self.residuals[t]) {
            *ct = ct.axpy(-self.c, r)?;
        }
        Ok(())
    }
}

/// The backward pass: `step_vjp` from the last step to the first, segment
/// by segment from the checkpoints (recomputing the `(theta_t, S_t)`
/// between them), each term's cotangents added around each VJP; then
/// `reset_vjp` on a first unroll. Returns d meta-loss / d phi.
fn backward<R: StepRunner>(
    runner: &mut R,
    layout: &L2oLayout,
    u: &Unroll<'_, R::Tensor>,
    phi: &Named<R::Tensor>,
    checkpoints: Vec<ThetaState<R::Tensor>>,
    steps: usize,
    terms: &[&dyn MetaLossTerm<R::Tensor>],
) -> Result<Named<R::Tensor>> {
    type T<R> = <R as StepRunner>::Tensor;
    let every = u.checkpoint_every.max(1);
    let Some((theta0, state0)) = checkpoints.first() else {
        bail!("an unroll with {steps} steps has no checkpoint");
    };
    let mut ct_theta: Vec<T<R>> = theta0.iter().map(|(_, t)| t.zeros_like()).collect();
    let mut ct_state: Vec<T<R>> = state0.iter().map(|(_, t)| t.zeros_like()).collect();
    let mut d_phi: Named<T<R>> = phi
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like()))
        .collect();
    let ct_names = |names: &[String]| -> Vec<String> {
        names.iter().map(|n| ct_name(&next_name(n))).collect()
    };
    let (ct_theta_names, ct_state_names) = (ct_names(&layout.theta), ct_names(&layout.state));
    let vjp_inputs: Named<T<R>> = terms.iter().flat_map(|t| t.vjp_inputs()).collect();
    for (k, (ck_theta, ck_state)) in checkpoints.into_iter().enumerate().rev() {
        // The segment [start, end): recompute its (theta_t, S_t) from the
        // checkpoint (nothing to recompute with `every` = 1).
        let start = k * every;
        let end = (start + every).min(steps);
        let mut seg: Vec<ThetaState<T<R>>> = vec![(ck_theta, ck_state)];
        for t in start..end - 1 {
            let (th, st) = seg.last().expect("segment start");
            let mb = u.minibatches.get(t)?;
            let mut out = run_step(runner, phi, th, st, &mb, u.probes_at(t))?;
            seg.push((
                next_of(&mut out, &layout.theta)?,
                next_of(&mut out, &layout.state)?,
            ));
        }
        for t in (start..end).rev() {
            let (th, st) = &seg[t - start];
            for term in terms {
                term.before_vjp(t, &mut ct_theta)?;
            }
            let mb = u.minibatches.get(t)?;
            let mut ins: Vec<(&str, &T<R>)> = vec![];
            for (n, x) in phi
                .iter()
                .chain(th)
                .chain(st)
                .chain(mb.iter())
                .chain(u.probes_at(t))
                .chain(&vjp_inputs)
            {
                ins.push((n.as_str(), x));
            }
            for (n, x) in ct_theta_names.iter().zip(&ct_theta) {
                ins.push((n.as_str(), x));
            }
            for (n, x) in ct_state_names.iter().zip(&ct_state) {
                ins.push((n.as_str(), x));
            }
            let mut out: HashMap<String, T<R>> =
                runner.run(Role::StepVjp, &ins)?.into_iter().collect();
            for (n, acc) in d_phi.iter_mut() {
                *acc = acc.add(lookup(&out, "step_vjp", &d_name(n))?)?;
            }
            // The cotangents of theta_0 and S_0 are not needed (truncation),
            // and those of S_0 may be inf/NaN where a decay state starts at
            // 0; the reset below reads only the hidden states.
            ct_theta = layout
                .theta
                .iter()
                .map(|n| take(&mut out, "step_vjp", &d_name(n)))
                .collect::<Result<_>>()?;
            for term in terms {
                term.after_vjp(t, &mut ct_theta)?;
            }
            ct_state = layout
                .state
                .iter()
                .map(|n| take(&mut out, "step_vjp", &d_name(n)))
                .collect::<Result<_>>()?;
        }
    }
    if u.reset {
        let hidden_ct: Vec<(String, T<R>)> = layout
            .state
            .iter()
            .zip(&ct_state)
            .filter(|(n, _)| layout.hidden.contains(n))
            .map(|(n, x)| (ct_name(&next_name(n)), x.clone()))
            .collect();
        let mut ins: Vec<(&str, &T<R>)> = phi.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (n, x) in &hidden_ct {
            ins.push((n.as_str(), x));
        }
        let out: HashMap<String, T<R>> = runner.run(Role::ResetVjp, &ins)?.into_iter().collect();
        for (n, acc) in d_phi.iter_mut() {
            if let Some(d) = out.get(&d_name(n)) {
                *acc = acc.add(d)?;
            }
        }
    }
    Ok(d_phi)
}

/// One unroll of truncated BPTT: [`forward`], the meta-loss terms (the log
/// objective, the regulariser, imitation), [`backward`]; see the module
/// docs.
pub fn truncated_bptt<R: StepRunner>(
    runner: &mut R,
    layout: &L2oLayout,
    u: &Unroll<'_, R::Tensor>,
) -> Result<BpttResult<R::Tensor>> {
    let Forward {
        phi,
        checkpoints,
        objective_grads,
        objectives,
        minibatch_losses,
        regs,
        residuals,
        squares,
        theta,
        state,
        diverged,
    } = forward(runner, layout, u)?;
    let steps = objectives.len();
    if steps == 0 {
        return Ok(BpttResult {
            meta_loss: 0.0,
            d_phi: phi
                .iter()
                .map(|(n, t)| (n.clone(), t.zeros_like()))
                .collect(),
            theta,
            state,
            objectives,
            minibatch_losses,
            regs,
            imitation_mse: vec![],
            diverged,
        });
    }
    let num_params: usize = theta.iter().map(|(_, x)| x.num_elements()).sum();
    let imitation_mse: Vec<f64> = squares.iter().map(|s| s / num_params as f64).collect();
    let regularizer = Regularizer {
        weight: u.reg_weight,
        sum: regs.iter().sum(),
    };
    let log_objective = LogObjective::new(&objectives, &objective_grads, u.initial_objective);
    let imitation = u.imitation.map(|(_, weight)| Imitation {
        residuals: &residuals,
        c: weight / (steps * num_params) as f64,
        value: weight * imitation_mse.iter().sum::<f64>() / steps as f64,
    });
    // In this order: the meta-loss is accumulated term by term.
    let mut terms: Vec<&dyn MetaLossTerm<R::Tensor>> = vec![&regularizer, &log_objective];
    if let Some(i) = &imitation {
        terms.push(i);
    }
    let mut meta_loss = 0.0;
    for term in &terms {
        term.add_value(&mut meta_loss);
    }
    let d_phi = backward(runner, layout, u, &phi, checkpoints, steps, &terms)?;
    Ok(BpttResult {
        meta_loss,
        d_phi,
        theta,
        state,
        objectives,
        minibatch_losses,
        regs,
        imitation_mse,
        diverged,
    })
}

/// A [`StepRunner`] on the f64 reference interpreter: the graphs as built by
/// the compiler (before export), evaluated exactly. For tests and checks.
pub struct GraphRunner {
    /// The graph of each role.
    pub graphs: HashMap<&'static str, Graph>,
    /// Whether `step` and `step_vjp` (respectively) run with the regulariser;
    /// the graphs without it run where not (when given).
    pub regularized: (bool, bool),
}

impl GraphRunner {
    /// A runner of the five roles' graphs, and of `step` and `step_vjp`
    /// without the regulariser if given.
    pub fn new(
        step: Graph,
        step_vjp: Graph,
        objective_chunk: Graph,
        reset: Graph,
        reset_vjp: Graph,
        unregularized: Option<(Graph, Graph)>,
    ) -> Self {
        let mut graphs = HashMap::from([
            ("step", step),
            ("step_vjp", step_vjp),
            (OBJECTIVE_CHUNK, objective_chunk),
            ("reset", reset),
            ("reset_vjp", reset_vjp),
        ]);
        if let Some((s, v)) = unregularized {
            graphs.insert(STEP_UNREGULARIZED, s);
            graphs.insert(STEP_VJP_UNREGULARIZED, v);
        }
        GraphRunner {
            graphs,
            regularized: (true, true),
        }
    }
}

/// The graph to run for `role`: the one without the regulariser where it
/// is not wanted and the runner has it, else the role's graph.
fn graph_for(role: Role, regularized: (bool, bool), has: impl Fn(&str) -> bool) -> &'static str {
    let wanted = match role {
        Role::Step => regularized.0,
        Role::StepVjp => regularized.1,
        _ => true,
    };
    match role.unregularized() {
        Some(name) if !wanted && has(name) => name,
        _ => role.graph(),
    }
}

impl StepRunner for GraphRunner {
    type Tensor = Value;
    fn run(&mut self, role: Role, inputs: &[(&str, &Value)]) -> Result<Named<Value>> {
        let name = graph_for(role, self.regularized, |n| self.graphs.contains_key(n));
        let g = self
            .graphs
            .get(name)
            .with_context(|| format!("no graph '{name}'"))?;
        let mut map = HashMap::new();
        for (n, v) in inputs {
            if g.find_input(n).is_some() {
                map.insert((*n).to_string(), (*v).clone());
            }
        }
        eval_graph(g, &map).with_context(|| format!("evaluating graph '{name}'"))
    }
    fn set_regularized(&mut self, measure: bool, differentiate: bool) {
        self.regularized = (measure, differentiate);
    }
}

/// A [`StepRunner`] on backend sessions (ONNX Runtime or tract), f32.
pub struct SessionRunner {
    /// The session of each graph it has.
    pub sessions: HashMap<&'static str, Box<dyn Session>>,
    /// Whether `step` and `step_vjp` (respectively) run with the regulariser;
    /// the graphs without it run where not (when the bundle has them).
    pub regularized: (bool, bool),
}

impl SessionRunner {
    /// Load the graphs of the five roles of an L2O bundle, and `step` and
    /// `step_vjp` without the regulariser where the bundle has them.
    pub fn from_bundle(bundle: &Bundle, backend: &dyn Backend) -> Result<Self> {
        let mut sessions = HashMap::new();
        for role in Role::ALL {
            let name = role.graph();
            let s = backend
                .load(&bundle.graph_bytes(name)?, name)
                .with_context(|| {
                    format!("loading '{name}' (compiled by an older metac? recompile the bundle with `metac compile l2o`)")
                })?;
            sessions.insert(name, s);
            if let Some(u) = role.unregularized() {
                if bundle.manifest.graph(u).is_some() {
                    sessions.insert(u, backend.load(&bundle.graph_bytes(u)?, u)?);
                }
            }
        }
        Ok(SessionRunner {
            sessions,
            regularized: (true, true),
        })
    }

    /// Whether the runner has `step` without the regulariser.
    pub fn has_unregularized(&self) -> bool {
        self.sessions.contains_key(STEP_UNREGULARIZED)
    }
}

impl StepRunner for SessionRunner {
    type Tensor = HostTensor;
    fn run(&mut self, role: Role, inputs: &[(&str, &HostTensor)]) -> Result<Named<HostTensor>> {
        let name = graph_for(role, self.regularized, |n| self.sessions.contains_key(n));
        let s = self
            .sessions
            .get_mut(name)
            .with_context(|| format!("no session of graph '{name}'"))?;
        let names = s.input_names();
        let ins: Vec<(&str, &HostTensor)> = inputs
            .iter()
            .filter(|(n, _)| names.iter().any(|m| m == n))
            .copied()
            .collect();
        s.run(&ins)
    }
    fn set_regularized(&mut self, measure: bool, differentiate: bool) {
        self.regularized = (measure, differentiate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_loss_term_derivative() {
        let (init, obj, h) = (2.0, 1.3, 1e-6);
        let (v, d) = meta_loss_term(obj, init);
        let fd = (meta_loss_term(obj + h, init).0 - meta_loss_term(obj - h, init).0) / (2.0 * h);
        assert!((d - fd).abs() < 1e-6 * d.abs(), "{d} vs {fd}");
        assert!((v - (obj / (init + eps()) + eps()).ln()).abs() < 1e-15);
    }
}
