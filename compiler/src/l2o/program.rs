//! The graphs of an L2O meta-training bundle.
//!
//! Meta-gradients come from explicit step adjoints (see
//! `shared/docs/architecture.md`): one inner step and its VJP are compiled;
//! the runtime unrolls them (`metac_runtime::l2o::bptt`). The graphs:
//!
//! * `step`: inputs `phi` (the HierarchicalRNN weights, `hrnn.*`), `theta`
//!   (`theta.<param>`), `S` (the optimizer state, `hrnn.state.*`), the
//!   minibatch (`batch.<input>`) and the objective set
//!   (`obj.<input>`; data-free problems have neither). Computes the minibatch
//!   loss `L(theta)`, `g = grad L` (a stop-gradient unless
//!   `use_second_derivatives`), `(theta', S') = Hrnn::step(phi, theta, g, S)`
//!   and the objective at `theta'` on the objective set with its gradient
//!   in `theta'`. Outputs `next.<theta>`, `next.<state>`, `objective`,
//!   `objective_grad.<theta>` and `minibatch_loss`.
//! * `step_vjp`: the step's inputs but the objective set, plus cotangents
//!   `ct.next.<theta>` and `ct.next.<state>`; outputs `d.<phi>`,
//!   `d.<theta>`, `d.<state>` (reverse mode over `(theta', S')`, through the
//!   gradient when second derivatives are on). **Choice:** the objective's
//!   cotangent reaches the step through `theta'` (the runtime adds
//!   `ct objective * objective_grad` to `ct.next.<theta>`), so the VJP
//!   neither reads the objective set nor recomputes its forward pass: the
//!   objective set is the largest input (10,000 MNIST images), and its
//!   activations are at hand in the forward step.
//! * With a regulariser (`[regularizer]`, see [`super::regularizer`]),
//!   `step` also reads the probes `reg.probe.<theta>` (`[P, *shape]`) and
//!   outputs `reg`, the regulariser on the minibatch loss at `theta`, and
//!   `step_vjp` reads the same probes and the cotangent `ct.reg`.
//! * `reset`: `phi -> next.<hidden state>`: the in-graph reset of the hidden
//!   states to the learnable init vectors (`hrnn.init.l{0,1,2}`), applied
//!   before the first step of a problem's first unroll. **Choice:** a separate
//!   graph rather than a `first_step` variant of the step, so that the step is
//!   compiled once; the runtime feeds the reset's outputs as `S_0`, and after
//!   the backward pass feeds `d S_0` (hidden entries only) into `reset_vjp`.
//! * `reset_vjp`: `phi`, `ct.next.<hidden state>` -> `d.hrnn.init.l{0,1,2}`.
//! * `meta_update`: the meta-optimizer, RMSProp on `phi` with the meta-
//!   gradient made finite (NaN -> 0) and clipped elementwise:
//!   `phi, ms.<phi>, d.<phi> -> next.<phi>, next.ms.<phi>`.
//! * `objective`: `theta`, objective set -> `objective` (and `accuracy` for
//!   classifiers): the initial objective and validation.
//!
//! The whole-unroll graph of [`L2oProgram::fused_unroll_graph`] is the
//! reference for the BPTT tests; it is not part of the bundle.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::{BundleBuilder, Manifest, Port, StateBuffer};
use metac_contract::init::{draw_all, TensorInit};
use metac_contract::l2o::{
    chunk_name, ct_name, d_name, ms_name, next_name, objective_grad_name, ImitationSpec, L2oInit,
    L2oLayout, L2oMeta, Metatest, MetatestStep, ProbeInput, RegularizeTime, RegularizerSchedule,
    METATEST_EVALUATE, METATEST_EVAL_BATCH, METATEST_LEARNED, META_UPDATE, MINIBATCH_LOSS,
    OBJECTIVE, OBJECTIVE_CHUNK, REG, STEP_UNREGULARIZED, STEP_VJP_UNREGULARIZED,
};
use metac_graphs::autodiff::{grad, vjp};
use metac_graphs::ops::Op;
use metac_graphs::passes::{
    column_sums_as_products, merge_shared_lhs_matmuls, merge_shared_rhs_matmuls, optimize,
};
use metac_graphs::{DType, Graph, NodeId, Tensor};

use super::config::{ImitationConfig, L2oConfig, MetaOptimizerConfig};
use super::regularizer::{RegOption, RegularizerSpec};
use crate::metatest::{build_evaluate, build_train_step, EvalGraph, MetaOptimizer};
use crate::models::baselines::{
    constant_rules, parse_baseline, Adam, Baseline, StepOptimizer, BUNDLE_BASELINES,
};
use crate::models::hrnn::Hrnn;
use crate::models::problems::{problem_by_name, Problem};

/// Name of the meta-loss output of the fused unroll graph.
pub const META_LOSS: &str = "meta_loss";
/// Name of the initial-objective input of the fused unroll graph.
pub const INITIAL_OBJECTIVE: &str = "initial_objective";
/// Name of the bundle graph of the compiled Adam step used for imitation.
pub const IMITATION_STEP: &str = "imitation_step";

/// The bundle graph holding baseline `label`'s `train_step` (e.g.
/// `baseline.adam-1e-3`) for the training problem.
pub fn baseline_graph_name(label: &str) -> String {
    format!("baseline.{label}")
}

/// The node transposing 2-D input `name` of `g` (`Transpose` with `perm
/// [1, 0]`), if there is one: a row-major objective's `X^T` in `X^T dH`.
fn input_transpose(g: &Graph, name: &str) -> Option<NodeId> {
    let x = g.find_input(name)?;
    g.nodes()
        .iter()
        .position(|n| {
            matches!(&n.op, Op::Transpose(p) if p.as_slice() == [1, 0]) && n.inputs == [x]
        })
        .map(|i| NodeId(i as u32))
}

/// Name of the regulariser-weight input of the fused unroll graph.
pub const REG_WEIGHT: &str = "reg_weight";
/// The epsilon of the log meta-objective.
pub const LOG_OBJECTIVE_EPS: f32 = 1e-6;

/// An L2O program: the learned optimizer, the problem it trains on (the
/// minibatch form and the objective-set form, which differ only in batch
/// size) and whether the meta-gradient goes through the optimizee gradient.
pub struct L2oProgram {
    pub hrnn: Hrnn,
    pub train: Box<dyn Problem>,
    pub objective: Box<dyn Problem>,
    pub use_second_derivatives: bool,
    /// The regulariser's graph shape (option `None`: no regulariser).
    pub regularizer: RegularizerSpec,
    /// Inner steps whose objectives one `objective_chunk` run measures.
    pub objective_chunk: usize,
}

/// The input nodes of one step.
struct StepInputs {
    phi: Vec<NodeId>,
    theta: Vec<NodeId>,
    state: Vec<NodeId>,
    batch: Vec<NodeId>,
    obj: Vec<NodeId>,
    /// The regulariser's probes, one per parameter (empty without).
    probes: Vec<NodeId>,
    /// Whether the step computes the regulariser (when there is one).
    regularized: bool,
}

/// The output nodes of one step.
struct StepOutputs {
    theta: Vec<NodeId>,
    state: Vec<NodeId>,
    /// The objective at the new parameters (when the objective set was given).
    objective: Option<NodeId>,
    minibatch_loss: NodeId,
    /// The regulariser at the old parameters (with one).
    reg: Option<NodeId>,
}

impl L2oProgram {
    /// `train` and `objective` must have the same parameters.
    pub fn new(
        hrnn: Hrnn,
        train: Box<dyn Problem>,
        objective: Box<dyn Problem>,
        use_second_derivatives: bool,
    ) -> Result<Self> {
        ensure!(
            train.param_shapes() == objective.param_shapes(),
            "the minibatch problem and the objective problem have different parameters"
        );
        ensure!(
            !train.param_shapes().is_empty(),
            "the problem has no parameters"
        );
        Ok(L2oProgram {
            hrnn,
            train,
            objective,
            use_second_derivatives,
            regularizer: RegularizerSpec {
                option: RegOption::None,
                num_probes: 1,
                power_iterations: 1,
                lanczos_steps: 1,
            },
            objective_chunk: 1,
        })
    }

    /// The program of a (validated) config.
    pub fn from_config(c: &L2oConfig) -> Result<Self> {
        c.validate()?;
        let e = |e: String| anyhow::anyhow!("config key 'problem': {e}");
        let train = problem_by_name(&c.problem, c.batch_size).map_err(e)?;
        let objective = problem_by_name(&c.problem, c.objective_examples).map_err(e)?;
        let mut p = Self::new(
            Hrnn::new(c.optimizer.hrnn_config()),
            train,
            objective,
            c.use_second_derivatives,
        )?;
        p.regularizer = c.regularizer.spec();
        p.objective_chunk = c.objective_chunk;
        Ok(p)
    }

    /// The probe inputs of the step graphs (`reg.probe.<theta>`, `[P, *shape]`).
    pub fn probe_inputs(&self) -> Vec<ProbeInput> {
        let p = self.regularizer.probe_count();
        if p == 0 {
            return vec![];
        }
        self.train
            .param_shapes()
            .into_iter()
            .map(|(n, s)| ProbeInput {
                name: format!("reg.probe.theta.{n}"),
                shape: std::iter::once(p).chain(s).collect(),
            })
            .collect()
    }

    fn declare_probes(&self, g: &mut Graph, prefix: &str) -> Vec<NodeId> {
        self.probe_inputs()
            .iter()
            .map(|p| g.input(&format!("{prefix}{}", p.name), DType::F32, &p.shape))
            .collect()
    }

    /// Shapes of the optimizee parameters.
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.train
            .param_shapes()
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// The names of the graphs' inputs by role.
    pub fn layout(&self) -> L2oLayout {
        let state: Vec<String> = self
            .hrnn
            .state_specs(&self.param_shapes())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // The entries reset_hidden replaces, found by applying it to a
        // scratch graph.
        let mut g = Graph::new();
        let phi = self.hrnn.weights().inputs(&mut g);
        let st = self.hrnn.state_inputs(&mut g, &self.param_shapes());
        let reset = self.hrnn.reset_hidden(&mut g, &phi, &st);
        let hidden = state
            .iter()
            .zip(st.iter().zip(&reset))
            .filter(|(_, (a, b))| a != b)
            .map(|(n, _)| n.clone())
            .collect();
        L2oLayout {
            phi: self
                .hrnn
                .weights()
                .specs
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            theta: self
                .train
                .param_shapes()
                .into_iter()
                .map(|(n, _)| format!("theta.{n}"))
                .collect(),
            state,
            hidden,
            batch: self
                .train
                .batch_inputs()
                .into_iter()
                .map(|(n, _, _)| format!("batch.{n}"))
                .collect(),
            objective_batch: self
                .objective
                .batch_inputs()
                .into_iter()
                .map(|(n, _, _)| format!("obj.{n}"))
                .collect(),
            objective_transposed: self.objective_transposed_inputs(),
            objective_chunk: self.objective_chunk,
        }
    }

    /// The transposed copies of objective-set inputs that `objective_chunk`
    /// reads, `(name, source)`: those of 2-D float inputs whose transpose a
    /// row-major objective's gradient takes (`X^T dH`), found by building the
    /// objective and its gradient for one parameter set on a scratch graph.
    /// An objective computed by columns ([`Problem::loss_by_columns`]) reads
    /// none: it reads the set itself on both sides of its products.
    fn objective_transposed_inputs(&self) -> Vec<(String, String)> {
        let mut g = Graph::new();
        let obj = Self::declare_batch(self.objective.as_ref(), &mut g, "obj.");
        let theta = self.declare_theta(&mut g, "theta.");
        if self
            .objective
            .loss_by_columns(&mut g, &theta, &obj)
            .is_some()
        {
            return vec![];
        }
        let loss = self.objective.loss(&mut g, &theta, &obj);
        for (k, d) in grad(&mut g, loss, &theta).into_iter().enumerate() {
            g.output(&format!("d{k}"), d);
        }
        let g = optimize(&g);
        self.objective
            .batch_inputs()
            .into_iter()
            .filter(|(_, d, s)| *d == DType::F32 && s.len() == 2)
            .map(|(n, _, _)| (format!("obj.{n}.T"), format!("obj.{n}")))
            .filter(|(_, src)| input_transpose(&g, src).is_some())
            .collect()
    }

    /// Replace the transposes of 2-D objective-set inputs in `g` (a
    /// row-major objective's gradient `X^T dH`) by the transposed inputs of
    /// the layout, which the runtime makes once per objective set: a plain
    /// MatMul is about twice as fast as a transposed one on ONNX Runtime's
    /// CPU GEMM for this shape (`[784, 10000] x [10000, 20]`). An objective
    /// by columns has none: its first layer `W^T @ X^T` is a GEMM with both
    /// operands transposed, which ONNX Runtime runs as fast as (measured:
    /// slightly faster than) a plain one, and which needs no transposed copy
    /// of the set (31 MB made for every unroll).
    fn hoist_objective_transposes(g: &Graph, l: &L2oLayout) -> Graph {
        let mut g = g.clone();
        for (t_name, src) in &l.objective_transposed {
            if let Some(t) = input_transpose(&g, src) {
                g.replace_with_input(t, t_name).expect("a fresh input name");
            }
        }
        optimize(&g)
    }

    fn declare_theta(&self, g: &mut Graph, prefix: &str) -> Vec<NodeId> {
        self.train
            .param_shapes()
            .iter()
            .map(|(n, s)| g.input(&format!("{prefix}{n}"), DType::F32, s))
            .collect()
    }

    fn declare_batch(problem: &dyn Problem, g: &mut Graph, prefix: &str) -> Vec<NodeId> {
        problem
            .batch_inputs()
            .iter()
            .map(|(n, d, s)| g.input(&format!("{prefix}{n}"), *d, s))
            .collect()
    }

    /// The step's inputs; the objective set only `with_objective`, the
    /// regulariser's probes only when `regularized`.
    fn declare_step_inputs(
        &self,
        g: &mut Graph,
        with_objective: bool,
        regularized: bool,
    ) -> StepInputs {
        let phi = self.hrnn.weights().inputs(g);
        let theta = self.declare_theta(g, "theta.");
        let state = self.hrnn.state_inputs(g, &self.param_shapes());
        let batch = Self::declare_batch(self.train.as_ref(), g, "batch.");
        let obj = if with_objective {
            Self::declare_batch(self.objective.as_ref(), g, "obj.")
        } else {
            vec![]
        };
        let probes = match regularized {
            true => self.declare_probes(g, ""),
            false => vec![],
        };
        StepInputs {
            phi,
            theta,
            state,
            batch,
            obj,
            probes,
            regularized,
        }
    }

    /// One inner step on already-declared nodes (`obj`: the objective set,
    /// `None` for no objective).
    fn step_core(&self, g: &mut Graph, i: &StepInputs, with_objective: bool) -> StepOutputs {
        let obj = with_objective.then_some(i.obj.as_slice());
        let probes = i.regularized.then_some(i.probes.as_slice());
        self.step_core_with(g, &i.phi, &i.theta, &i.state, &i.batch, obj, probes, None)
    }

    /// [`Self::step_core`], with the optimizee gradients given instead of
    /// derived when `given_grads` is set; the regulariser only with
    /// `probes` (empty for one that reads none).
    #[allow(clippy::too_many_arguments)]
    fn step_core_with(
        &self,
        g: &mut Graph,
        phi: &[NodeId],
        theta: &[NodeId],
        state: &[NodeId],
        batch: &[NodeId],
        obj: Option<&[NodeId]>,
        probes: Option<&[NodeId]>,
        given_grads: Option<&[NodeId]>,
    ) -> StepOutputs {
        let loss = self.train.loss(g, theta, batch);
        // The true gradient: the regulariser differentiates through it even
        // when the optimizer's input is cut or given.
        let true_grads = grad(g, loss, theta);
        let reg = probes.and_then(|p| self.regularizer.build(g, theta, &true_grads, p));
        let grads = match given_grads {
            Some(gr) => gr.to_vec(),
            None if self.use_second_derivatives => true_grads,
            None => true_grads.into_iter().map(|x| g.stop_gradient(x)).collect(),
        };
        let (nt, ns) = self.hrnn.step(g, phi, theta, &grads, state, loss);
        let objective = obj.map(|obj| self.objective.loss(g, &nt, obj));
        StepOutputs {
            theta: nt,
            state: ns,
            objective,
            minibatch_loss: loss,
            reg,
        }
    }

    fn add_step_outputs(&self, g: &mut Graph, l: &L2oLayout, o: &StepOutputs) {
        for (n, &id) in l.theta.iter().zip(&o.theta) {
            g.output(&next_name(n), id);
        }
        for (n, &id) in l.state.iter().zip(&o.state) {
            g.output(&next_name(n), id);
        }
    }

    /// The `step` graph (optimized): `phi, theta, S, minibatch (, probes)
    /// -> next.*, minibatch_loss (, reg)`. The objective after the step is
    /// measured separately, several steps at a time
    /// ([`Self::objective_chunk_graph`]).
    pub fn step_graph(&self) -> Graph {
        self.step_graph_with(true)
    }

    /// `step` and `step_vjp` without the regulariser, for unrolls that do
    /// not count it (`None` without a regulariser).
    pub fn unregularized_step_graphs(&self) -> Option<(Graph, Graph)> {
        (self.regularizer.option != RegOption::None)
            .then(|| (self.step_graph_with(false), self.step_vjp_graph_with(false)))
    }

    fn step_graph_with(&self, regularized: bool) -> Graph {
        let l = self.layout();
        let mut g = Graph::new();
        let i = self.declare_step_inputs(&mut g, false, regularized);
        let o = self.step_core(&mut g, &i, false);
        self.add_step_outputs(&mut g, &l, &o);
        if let Some(r) = o.reg {
            g.output(REG, r);
        }
        g.output(MINIBATCH_LOSS, o.minibatch_loss);
        optimize(&g)
    }

    /// The `objective_chunk` graph (optimized): the objective and its
    /// gradient at `objective_chunk` parameter sets on one objective set,
    /// `t<i>.theta.*, obj.* -> t<i>.objective, t<i>.objective_grad.theta.*`.
    /// The products of the objective set (and of its transpose, an input
    /// made once per set) with the parameter sets are merged into one wide
    /// product each, so the set is read once per chunk instead of once per
    /// step.
    pub fn objective_chunk_graph(&self) -> Graph {
        let l = self.layout();
        let mut g = Graph::new();
        let obj = Self::declare_batch(self.objective.as_ref(), &mut g, "obj.");
        for k in 0..self.objective_chunk {
            let theta = self.declare_theta(&mut g, &chunk_name(k, "theta."));
            let o = match self.objective.loss_by_columns(&mut g, &theta, &obj) {
                Some(o) => o,
                None => self.objective.loss(&mut g, &theta, &obj),
            };
            g.output(&chunk_name(k, OBJECTIVE), o);
            let og = grad(&mut g, o, &theta);
            for (n, x) in l.theta.iter().zip(og) {
                g.output(&chunk_name(k, &objective_grad_name(n)), x);
            }
        }
        let g = Self::hoist_objective_transposes(&optimize(&g), &l);
        // Bias gradients (sums over the set's rows) as products with a row of
        // ones, which the merge then makes one product for the whole chunk.
        let g = column_sums_as_products(&g);
        let g = merge_shared_lhs_matmuls(&optimize(&g));
        optimize(&merge_shared_rhs_matmuls(&optimize(&g)))
    }

    /// The `step_vjp` graph (optimized): the meta-gradient subgraph.
    pub fn step_vjp_graph(&self) -> Graph {
        self.step_vjp_graph_with(true)
    }

    fn step_vjp_graph_with(&self, regularized: bool) -> Graph {
        let l = self.layout();
        let mut g = Graph::new();
        let i = self.declare_step_inputs(&mut g, false, regularized);
        let o = self.step_core(&mut g, &i, false);
        let mut seeds = vec![];
        if let Some(r) = o.reg {
            let ct = g.input(&ct_name(REG), DType::F32, &[]);
            seeds.push((r, ct));
        }
        for (n, &y) in l.theta.iter().zip(&o.theta) {
            let s = g.shape(y).to_vec();
            let ct = g.input(&ct_name(&next_name(n)), DType::F32, &s);
            seeds.push((y, ct));
        }
        for (n, &y) in l.state.iter().zip(&o.state) {
            let s = g.shape(y).to_vec();
            let ct = g.input(&ct_name(&next_name(n)), DType::F32, &s);
            seeds.push((y, ct));
        }
        let wrt: Vec<NodeId> = i
            .phi
            .iter()
            .chain(&i.theta)
            .chain(&i.state)
            .copied()
            .collect();
        let names: Vec<&String> = l.phi.iter().chain(&l.theta).chain(&l.state).collect();
        let cots = vjp(&mut g, &seeds, &wrt);
        for ((n, c), &w) in names.into_iter().zip(cots).zip(&wrt) {
            let c = c.unwrap_or_else(|| g.zeros_like(w));
            g.output(&d_name(n), c);
        }
        optimize(&g)
    }

    /// Build the reset on `phi`: the new hidden states, by state name.
    fn reset_core(&self, g: &mut Graph, phi: &[NodeId], l: &L2oLayout) -> Vec<(String, NodeId)> {
        let specs = self.hrnn.state_specs(&self.param_shapes());
        // Placeholders for the state: reset_hidden reads only their shapes.
        let st: Vec<NodeId> = specs.iter().map(|(_, s)| g.zeros(s)).collect();
        let out = self.hrnn.reset_hidden(g, phi, &st);
        l.state
            .iter()
            .zip(out)
            .filter(|(n, _)| l.hidden.contains(n))
            .map(|(n, id)| (n.clone(), id))
            .collect()
    }

    /// The `reset` graph (optimized): `phi -> next.<hidden state>`.
    pub fn reset_graph(&self) -> Graph {
        let l = self.layout();
        let mut g = Graph::new();
        let phi = self.hrnn.weights().inputs(&mut g);
        for (n, id) in self.reset_core(&mut g, &phi, &l) {
            // `hrnn.init.l1`/`.l2` are outputs as they are; the export routes
            // such outputs through Identity.
            g.output(&next_name(&n), id);
        }
        optimize(&g)
    }

    /// The `reset_vjp` graph (optimized): `phi, ct.next.<hidden>` -> `d.<init vectors>`.
    pub fn reset_vjp_graph(&self) -> Graph {
        let l = self.layout();
        let mut g = Graph::new();
        let phi = self.hrnn.weights().inputs(&mut g);
        let outs = self.reset_core(&mut g, &phi, &l);
        let mut seeds = vec![];
        for (n, y) in &outs {
            let s = g.shape(*y).to_vec();
            let ct = g.input(&ct_name(&next_name(n)), DType::F32, &s);
            seeds.push((*y, ct));
        }
        let cots = vjp(&mut g, &seeds, &phi);
        for (n, c) in l.phi.iter().zip(cots) {
            if let Some(c) = c {
                g.output(&d_name(n), c);
            }
        }
        optimize(&g)
    }

    /// The `objective` graph (optimized): `theta, obj.* -> objective (, accuracy)`.
    pub fn objective_graph(&self) -> Graph {
        let mut g = Graph::new();
        let theta = self.declare_theta(&mut g, "theta.");
        let obj = Self::declare_batch(self.objective.as_ref(), &mut g, "obj.");
        let o = self.objective.loss(&mut g, &theta, &obj);
        g.output(OBJECTIVE, o);
        if let Some(a) = self.objective.accuracy(&mut g, &theta, &obj) {
            g.output("accuracy", a);
        }
        optimize(&g)
    }

    /// The whole unroll of `k` steps as one graph (not optimized, so that it
    /// can be differentiated as built): inputs `phi`, `theta.*`, the state,
    /// per step `t<i>.batch.*`, the objective set `obj.*` and the scalar
    /// `initial_objective`; output `meta_loss` =
    /// `mean_t log(obj_t / (initial_objective + 1e-6) + 1e-6)`. With `reset`
    /// the hidden states are first reset from `phi`. The reference for BPTT.
    ///
    /// With a regulariser the graph also reads per step the probes
    /// `t<i>.reg.probe.<theta>` and the scalar `reg_weight`, and the
    /// meta-loss adds `reg_weight * sum_t reg_t`.
    ///
    /// With `frozen_grads` the optimizee gradients are inputs
    /// `t<i>.grad.<theta>` instead of being derived; otherwise they are extra
    /// outputs of those names. Fed back at the same point, the frozen form has
    /// the same value, and its derivative in `phi` is the meta-gradient with
    /// `use_second_derivatives = false` (gradients as constants): the finite-
    /// difference reference for that mode.
    pub fn fused_unroll_graph(&self, k: usize, reset: bool, frozen_grads: bool) -> Graph {
        assert!(k > 0, "fused_unroll_graph: k must be at least 1");
        let l = self.layout();
        let mut g = Graph::new();
        let phi = self.hrnn.weights().inputs(&mut g);
        let mut theta = self.declare_theta(&mut g, "theta.");
        let mut state = self.hrnn.state_inputs(&mut g, &self.param_shapes());
        let obj = Self::declare_batch(self.objective.as_ref(), &mut g, "obj.");
        let init = g.input(INITIAL_OBJECTIVE, DType::F32, &[]);
        if reset {
            state = self.hrnn.reset_hidden(&mut g, &phi, &state);
        }
        let reg_weight = (self.regularizer.option != RegOption::None)
            .then(|| g.input(REG_WEIGHT, DType::F32, &[]));
        let c = g.add_scalar(init, LOG_OBJECTIVE_EPS);
        let mut total: Option<NodeId> = None;
        let mut reg_total: Option<NodeId> = None;
        let mut grad_outputs = vec![];
        for t in 0..k {
            let batch = Self::declare_batch(self.train.as_ref(), &mut g, &format!("t{t}.batch."));
            let grads = if frozen_grads {
                let v: Vec<NodeId> = l
                    .theta
                    .iter()
                    .zip(&theta)
                    .map(|(n, &th)| {
                        let s = g.shape(th).to_vec();
                        g.input(&format!("t{t}.grad.{n}"), DType::F32, &s)
                    })
                    .collect();
                Some(v)
            } else {
                let loss = self.train.loss(&mut g, &theta, &batch);
                let gr = grad(&mut g, loss, &theta);
                for (n, &x) in l.theta.iter().zip(&gr) {
                    grad_outputs.push((format!("t{t}.grad.{n}"), x));
                }
                None
            };
            let probes = self.declare_probes(&mut g, &format!("t{t}."));
            let o = self.step_core_with(
                &mut g,
                &phi,
                &theta,
                &state,
                &batch,
                Some(&obj),
                Some(&probes),
                grads.as_deref(),
            );
            reg_total = g.add_opt(reg_total, o.reg);
            let objective = o.objective.expect("built with the objective set");
            let r = g.div(objective, c);
            let r = g.add_scalar(r, LOG_OBJECTIVE_EPS);
            let term = g.log(r);
            total = g.add_opt(total, Some(term));
            theta = o.theta;
            state = o.state;
        }
        let kk = g.scalar(k as f32);
        let mut m = g.div(total.expect("k > 0"), kk);
        if let (Some(w), Some(r)) = (reg_weight, reg_total) {
            let wr = g.mul(w, r);
            m = g.add(m, wr);
        }
        g.output(META_LOSS, m);
        for (n, x) in grad_outputs {
            g.output(&n, x);
        }
        g
    }

    /// Initial meta-parameters.
    pub fn init_phi(&self, seed: u64) -> Vec<(String, Tensor)> {
        self.hrnn.weights().init(seed)
    }

    /// How fresh optimizee parameters (named `theta.<param>`) and optimizer
    /// state (hidden states 0: `reset` sets them on the first unroll) are
    /// drawn: what the bundle carries as `meta.l2o.init`, so that the
    /// runtime draws the values [`L2oProgram::init_theta`] and
    /// [`L2oProgram::init_state`] give.
    pub fn init_rules(&self) -> Result<L2oInit> {
        let rules = self.train.init_rules().with_context(|| {
            format!(
                "problem '{}' has no initialisation rules a bundle can carry",
                self.train.name()
            )
        })?;
        let theta = self
            .layout()
            .theta
            .into_iter()
            .zip(rules)
            .map(|(name, r)| TensorInit { name, ..r })
            .collect();
        Ok(L2oInit {
            theta,
            state: self.hrnn.initial_state_rules(&self.param_shapes()),
        })
    }

    /// Initial optimizee parameters, named `theta.<param>`.
    pub fn init_theta(&self, seed: u64) -> Vec<(String, Tensor)> {
        self.layout()
            .theta
            .into_iter()
            .zip(self.train.init_params(seed))
            .collect()
    }

    /// Initial optimizer state (hidden states 0: run `reset` on the first
    /// unroll).
    pub fn init_state(&self, seed: u64) -> Vec<(String, Tensor)> {
        draw_all(&self.hrnn.initial_state_rules(&self.param_shapes()), seed)
    }

    /// The `evaluate` graph `metac eval` runs on the training problem: the
    /// loss (and accuracy) over chunks of [`METATEST_EVAL_BATCH`] examples,
    /// or the loss itself for data-free problems.
    pub fn metatest_evaluate(&self) -> Result<EvalGraph> {
        if self.train.needs_data().is_none() {
            return Ok(build_evaluate(self.train.as_ref()));
        }
        let p = problem_by_name(self.train.name(), METATEST_EVAL_BATCH).map_err(|e| {
            anyhow::anyhow!(
                "the evaluation graph of problem '{}': {e}",
                self.train.name()
            )
        })?;
        Ok(build_evaluate(p.as_ref()))
    }

    /// The runtime's view of the regulariser (`None` without one).
    fn regularizer_schedule(
        &self,
        c: &super::config::RegularizerConfig,
    ) -> Option<RegularizerSchedule> {
        if self.regularizer.option == RegOption::None {
            return None;
        }
        let option = serde_json::to_value(self.regularizer.option)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        Some(RegularizerSchedule {
            option,
            alpha: c.alpha,
            time: c.regularize_time.unwrap_or(RegularizeTime::None),
            posterior_scale: c.posterior_scale,
            probe_kind: self.regularizer.probe_kind(),
            probes: self.probe_inputs(),
        })
    }

    /// The `meta_update` graph: RMSProp on the meta-parameters, with the
    /// meta-gradient's NaNs set to 0 and its entries clipped to
    /// `[-clip, clip]`; an entry with a zero (sanitised) gradient is left
    /// unchanged (so `eps = 0` never divides 0 by 0).
    pub fn meta_update_graph(&self, m: &MetaOptimizerConfig) -> Graph {
        let mut g = Graph::new();
        for spec in self.hrnn.weights().specs {
            let p = g.input(&spec.name, DType::F32, &spec.shape);
            let ms = g.input(&ms_name(&spec.name), DType::F32, &spec.shape);
            let d = g.input(&d_name(&spec.name), DType::F32, &spec.shape);
            let zero = g.scalar(0.0);
            let finite = g.equal(d, d);
            let d = g.where_(finite, d, zero);
            let lo = g.scalar(-m.clip as f32);
            let hi = g.scalar(m.clip as f32);
            let d = g.max(d, lo);
            let d = g.min(d, hi);
            let old = g.mul_scalar(ms, m.decay as f32);
            let sq = g.square(d);
            let new = g.mul_scalar(sq, (1.0 - m.decay) as f32);
            let ms2 = g.add(old, new);
            let den = g.add_scalar(ms2, m.eps as f32);
            let den = g.sqrt(den);
            let step = g.div(d, den);
            let step = g.mul_scalar(step, m.lr as f32);
            let is_zero = g.equal(d, zero);
            let step = g.where_(is_zero, zero, step);
            let p2 = g.sub(p, step);
            g.output(&next_name(&spec.name), p2);
            g.output(&next_name(&ms_name(&spec.name)), ms2);
        }
        optimize(&g)
    }

    /// The `imitation_step` graph (compiled Adam on the minibatch problem)
    /// and the runtime's view of it.
    fn imitation_graph(&self, c: &ImitationConfig) -> (Graph, ImitationSpec) {
        let adam = Baseline::Adam(Adam {
            lr: c.lr as f32,
            ..Adam::default()
        });
        let ts = build_train_step(self.train.as_ref(), &MetaOptimizer::Baseline(adam));
        let l = self.layout();
        let shapes: Vec<Vec<usize>> = self.param_shapes();
        let spec = ImitationSpec {
            mt_ratio: c.mt_ratio,
            mt_k: c.mt_k,
            weight: c.weight,
            lr: c.lr,
            graph: IMITATION_STEP.into(),
            params: ts.io.params.iter().cloned().zip(l.theta.clone()).collect(),
            batch: ts.io.batch.iter().cloned().zip(l.batch.clone()).collect(),
            state: adam.state_specs(&shapes),
            new_params: ts.io.new_params.clone(),
            new_state: ts.io.new_state.clone(),
        };
        (optimize(&ts.graph), spec)
    }

    /// Write the bundle (`kind = "l2o"`) into `dir`; `meta` goes under
    /// `meta.l2o.config`, the regulariser's run-time settings
    /// (`regularizer`) under `meta.l2o.regularizer`, and with imitation the
    /// compiled Adam step as graph `imitation_step`, described under
    /// `meta.l2o.imitation`.
    pub fn write_bundle(
        &self,
        seed: u64,
        config_meta: serde_json::Value,
        regularizer: &super::config::RegularizerConfig,
        imitation: &ImitationConfig,
        meta_optimizer: &MetaOptimizerConfig,
        dir: &Path,
    ) -> Result<Manifest> {
        let l = self.layout();
        let meta_update = self.meta_update_graph(meta_optimizer);
        let imitation = (imitation.mt_ratio > 0.0).then(|| self.imitation_graph(imitation));
        let mut graphs = vec![
            ("step", self.step_graph()),
            ("step_vjp", self.step_vjp_graph()),
            ("reset", self.reset_graph()),
            ("reset_vjp", self.reset_vjp_graph()),
            ("objective", self.objective_graph()),
            (OBJECTIVE_CHUNK, self.objective_chunk_graph()),
        ];
        if let Some((step, vjp)) = self.unregularized_step_graphs() {
            graphs.push((STEP_UNREGULARIZED, step));
            graphs.push((STEP_VJP_UNREGULARIZED, vjp));
        }
        let mut b = BundleBuilder::new("l2o");
        for (name, g) in &graphs {
            b.graph(name, g)?;
        }
        b.graph(META_UPDATE, &meta_update)?;
        if let Some((g, _)) = &imitation {
            b.graph(IMITATION_STEP, g)?;
        }
        // Meta-testing on the training problem: the learned optimizer's and
        // the baselines' steps and the evaluation, as `metac eval` builds
        // them (it runs these when problem and batch sizes match).
        let shapes = self.param_shapes();
        let mut steps = vec![];
        let learned = MetaOptimizer::Hrnn(self.hrnn.clone());
        let ts = build_train_step(self.train.as_ref(), &learned);
        b.graph(METATEST_LEARNED, &optimize(&ts.graph))?;
        steps.push(MetatestStep {
            label: "learned".into(),
            graph: METATEST_LEARNED.into(),
            io: ts.io,
            state: self.hrnn.initial_state_rules(&shapes),
        });
        for label in BUNDLE_BASELINES {
            let opt = parse_baseline(label).map_err(anyhow::Error::msg)?;
            let ts = build_train_step(self.train.as_ref(), &MetaOptimizer::Baseline(opt));
            let graph = baseline_graph_name(label);
            b.graph(&graph, &optimize(&ts.graph))?;
            steps.push(MetatestStep {
                label: label.into(),
                graph,
                io: ts.io,
                state: constant_rules(opt.initial_state(&shapes))?,
            });
        }
        let evaluate = self.metatest_evaluate()?;
        b.graph(METATEST_EVALUATE, &optimize(&evaluate.graph))?;
        let metatest = Metatest {
            steps,
            evaluate: METATEST_EVALUATE.into(),
            evaluate_io: evaluate.io,
        };
        let port = |graph: &str, tensor: &str| Port {
            graph: graph.into(),
            tensor: tensor.into(),
        };
        let has_input = |graph: &str, name: &str| {
            graphs
                .iter()
                .chain(std::iter::once(&(META_UPDATE, meta_update.clone())))
                .any(|(n, g)| *n == graph && g.find_input(name).is_some())
        };
        let buffer = |b: &mut BundleBuilder, name: &str, t: Tensor, updated: Option<Port>| {
            let reads = graphs
                .iter()
                .map(|(gn, _)| *gn)
                .chain(std::iter::once(META_UPDATE))
                .filter(|gn| has_input(gn, name))
                .map(|gn| port(gn, name))
                .collect();
            b.state(StateBuffer {
                name: name.into(),
                dtype: t.dtype().name().into(),
                shape: t.shape.clone(),
                init: Some(name.into()),
                reads,
                updated_by: updated,
            });
            b.init_tensor(name, t);
        };
        // phi and its accumulators are updated by the compiled meta-optimizer.
        for (n, t) in self.init_phi(seed) {
            let ms = Tensor::f32(
                &t.shape,
                vec![meta_optimizer.accumulator_init as f32; t.shape.iter().product()],
            );
            buffer(&mut b, &n, t, Some(port(META_UPDATE, &next_name(&n))));
            let m = ms_name(&n);
            buffer(&mut b, &m, ms, Some(port(META_UPDATE, &next_name(&m))));
        }
        for (n, t) in self
            .init_theta(seed)
            .into_iter()
            .chain(self.init_state(seed))
        {
            let up = port("step", &next_name(&n));
            buffer(&mut b, &n, t, Some(up));
        }
        let batch_size = |p: &dyn Problem| {
            p.batch_inputs()
                .first()
                .and_then(|(_, _, s)| s.first().copied())
                .unwrap_or(0)
        };
        let meta = L2oMeta {
            config: config_meta,
            problem: self.train.name().to_string(),
            data: self.train.needs_data(),
            seed,
            batch_size: batch_size(self.train.as_ref()),
            objective_examples: batch_size(self.objective.as_ref()),
            layout: l,
            meta_objective: "mean_t log(obj_t / (initial_obj + 1e-6) + 1e-6)".into(),
            reset: "run `reset` before the first step of a problem's first unroll".into(),
            regularizer: self.regularizer_schedule(regularizer),
            imitation: imitation.map(|(_, s)| s),
            init: self.init_rules()?,
            metatest,
        };
        b.meta(meta.to_meta());
        b.write(dir)
    }
}

/// Compile the L2O program of `config` into a bundle in `out_dir`.
pub fn compile_l2o(config: &L2oConfig, out_dir: &Path) -> Result<Manifest> {
    let p = L2oProgram::from_config(config)?;
    p.write_bundle(
        config.seed,
        config.compile_meta(),
        &config.regularizer,
        &config.imitation,
        &config.meta_optimizer,
        out_dir,
    )
}
