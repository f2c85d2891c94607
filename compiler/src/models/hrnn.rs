//! The L2O-Scale HierarchicalRNN learned optimizer (Wichrowska et al. 2017,
//! `research/learned_optimizer/optimizer/hierarchical_rnn.py`), as a graph:
//! one optimizer step `(weights, params, grads, state) -> (params', state')`
//! built on the builder, so that autodiff can differentiate an unrolled
//! optimisation with respect to the optimizer's own weights.
//!
//! The reference is `shared/docs/l2o-scale.md` ("HierarchicalRNN (defaults of
//! metarun.py)" and "Update step"), checked against the original code. Every
//! point where the notes leave a choice open is marked **Choice:** below.
//!
//! # Levels
//! * Level 0, per parameter element (`level_sizes[0]` = 10 units): input = the
//!   per-element features, injected bias = affine(old level-1 state of the
//!   tensor) + affine(old global state).
//! * Level 1, per tensor (20 units): input = mean over the tensor's elements
//!   of `concat(new level-0 state, features)`, injected bias =
//!   affine(old global state).
//! * Level 2, global (20 units): input per [`Level2Input`], no injected bias.
//!
//! # Features (12 per element with the defaults)
//! `gs_0..gs_3` (RMS-scaled, asinh-squashed gradient accumulators on 4
//! time scales), `gs_i * gs_{i+1}` (3 products), `log(ms_i + 1e-16)` minus
//! its mean over the scales (4), and the relative log learning rate (1), in
//! that order (the order of the original `rnn_input` list).
//!
//! # State layout
//! See [`Hrnn::state_specs`]. The per-element entries of all parameter
//! tensors are packed into one `[N, *]` tensor each ([`Packing`]); per-tensor
//! quantities are computed over each tensor's own rows.
//!
//! # Initial RNN states
//! The initial hidden states are learnable vectors (`hrnn.init.l{0,1,2}`,
//! `[1, size]`). In the original they enter the unroll in-graph on a reset
//! (the first unroll of a problem), so the meta-gradient reaches them. Here
//! [`Hrnn::reset_hidden`] does that in a graph; [`Hrnn::initial_state`]
//! gives host values with zero hidden states (placeholders for
//! `reset_hidden`), and [`Hrnn::initial_state_with_weights`] host values with
//! the hidden states taken from given weight values (for meta-testing).

use metac_contract::init::{draw_all, InitRule, TensorInit};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Lower clip of the log learning rate, fixed in the original code
/// ("log(min int32) - 1"); the upper clip is [`HrnnConfig::max_log_lr`].
pub const MIN_LOG_LR: f64 = -33.0;

/// Epsilon added to the squared accumulated gradient in the `ms` update.
const MS_EPS: f32 = 1e-12;
/// Epsilon under the square roots / logs of `ms` and of the output scale.
const EPS16: f32 = 1e-16;

/// What the global (level-2) RNN reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level2Input {
    /// The original code: `_compute_updated_global_state([layer_state], ...)`
    /// is called after the per-tensor loop with only the loop variable
    /// `layer_state`, i.e. the new level-1 state of the LAST parameter tensor.
    /// The mean over a one-element list is that state. A quirk, but it is
    /// what every published HierarchicalRNN checkpoint was trained with.
    LastTensor,
    /// The natural reading of the paper ("average hidden state from each
    /// layer-specific RNN"): the mean over all tensors of their new level-1
    /// states.
    MeanOverTensors,
}

/// Hyperparameters of the HierarchicalRNN. `Default` gives the defaults of
/// `metarun.py` as listed in the reference notes.
///
/// `use_log_objective` (on in metarun.py) is not here: it only shapes the
/// meta-objective, which the meta-training code builds, not the step.
/// Attention is off and not supported.
#[derive(Clone, Debug, PartialEq)]
pub struct HrnnConfig {
    /// Units of the per-parameter, per-tensor and global RNNs.
    pub level_sizes: [usize; 3],
    /// Number of gradient accumulators (time scales); at least 1. With 1 the
    /// accumulator is the raw gradient (as in the original).
    pub num_gradient_scales: usize,
    /// Learn the input- and scale-decay readouts. When off, the decays are
    /// the original's constants sigmoid(log(0.89/0.11)) = 0.89 (input) and
    /// 0.93 (scale). The input decay is learnable only with more than one
    /// gradient scale, as in the original.
    pub learnable_decay: bool,
    /// Per-element log learning rates with a learned change, and the update
    /// direction normalised to unit RMS per tensor. When off: no `log_lr`
    /// state, no normalisation, and the step size is the original's
    /// `2 * sigmoid(h . 0 + 0) = 1`.
    pub dynamic_output_scale: bool,
    /// Feed the centred `log(ms_i + 1e-16)` features.
    pub use_log_means_squared: bool,
    /// Feed the relative log learning rate (requires `dynamic_output_scale`).
    pub use_relative_lr: bool,
    /// Relative lr against the mean log lr over the whole problem (all
    /// tensors' elements) rather than over the tensor.
    pub use_problem_lr_mean: bool,
    /// Add `affine(concat(gs), 1, no bias)` to the update direction.
    pub use_gradient_shortcut: bool,
    /// Feed the products of consecutive scaled gradients (needs > 1 scale).
    pub use_grad_products: bool,
    /// Range of the initial learning rates, see [`Hrnn::initial_state`].
    pub init_lr_range: (f64, f64),
    /// Upper clip of the log learning rate.
    pub max_log_lr: f64,
    /// The level-2 input quirk.
    pub level2_input: Level2Input,
    // ---- initialisation (flags of hierarchical_rnn.py) ----
    /// Std scale of the BiasGRU cells' affine weights (`biasgrucell_scale`).
    pub cell_scale: f64,
    /// Bias of the reset and update gates (`biasgrucell_gate_bias_init`).
    pub gate_bias_init: f64,
    /// Std scale of the readouts (update, decays), divided by
    /// `sqrt(level_sizes[0])` (`hrnn_rnn_readout_scale`).
    pub readout_scale: f64,
    /// Std scale of the injected-bias affines (`hrnn_affine_scale`).
    pub affine_scale: f64,
    /// Bias of the scale-decay readout (`scale_decay_bias_init`).
    pub scale_decay_bias_init: f64,
    /// Bias of the input-decay readout (`hrnn_default_decay_var_init`).
    pub inp_decay_bias_init: f64,
    /// Initial learning-rate momentum logit.
    pub lr_momentum_logit_init: f64,
    /// Initial `param_stepsize_offset`.
    pub param_stepsize_offset_init: f64,
    /// Std scale of the gradient-shortcut weights (the default `scale` of
    /// `utils.affine`, 0.1), divided by `sqrt(num_gradient_scales)`; their
    /// mean is `1 / num_gradient_scales`.
    pub shortcut_scale: f64,
}

impl Default for HrnnConfig {
    fn default() -> Self {
        HrnnConfig {
            level_sizes: [10, 20, 20],
            num_gradient_scales: 4,
            learnable_decay: true,
            dynamic_output_scale: true,
            use_log_means_squared: true,
            use_relative_lr: true,
            use_problem_lr_mean: true,
            use_gradient_shortcut: true,
            use_grad_products: true,
            init_lr_range: (1e-6, 1e-2),
            max_log_lr: 33.0,
            level2_input: Level2Input::LastTensor,
            cell_scale: 0.5,
            gate_bias_init: 2.2,
            readout_scale: 0.5,
            affine_scale: 0.5,
            scale_decay_bias_init: 3.2,
            inp_decay_bias_init: 2.2,
            lr_momentum_logit_init: 3.2,
            param_stepsize_offset_init: -1.0,
            shortcut_scale: 0.1,
        }
    }
}

impl HrnnConfig {
    /// Number of per-element input features of the level-0 RNN.
    pub fn num_features(&self) -> usize {
        let s = self.num_gradient_scales;
        let mut f = s;
        if self.use_grad_products && s > 1 {
            f += s - 1;
        }
        if self.use_log_means_squared {
            f += s;
        }
        if self.use_relative_lr {
            f += 1;
        }
        f
    }

    fn learnable_inp_decay(&self) -> bool {
        self.learnable_decay && self.num_gradient_scales > 1
    }

    fn validate(&self) {
        assert!(
            self.num_gradient_scales >= 1,
            "HrnnConfig: num_gradient_scales must be >= 1"
        );
        assert!(
            self.level_sizes.iter().all(|&s| s > 0),
            "HrnnConfig: level sizes must be positive"
        );
        assert!(
            !self.use_relative_lr || self.dynamic_output_scale,
            "HrnnConfig: use_relative_lr requires dynamic_output_scale (as in the original)"
        );
        let (lo, hi) = self.init_lr_range;
        assert!(
            lo > 0.0 && lo <= hi,
            "HrnnConfig: init_lr_range must satisfy 0 < min <= max"
        );
    }
}

/// How one meta-parameter tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightInit {
    /// i.i.d. normal.
    Normal { mean: f64, std: f64 },
    /// i.i.d. uniform on `[lo, hi)`.
    Uniform { lo: f64, hi: f64 },
    /// Every element equal.
    Const(f64),
}

/// One meta-parameter tensor of the optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: WeightInit,
}

/// The meta-parameters (learned weights) of a HierarchicalRNN, in the order
/// [`Hrnn::step`] expects them.
///
/// With the default config (F = 12 features, sizes 10/20/20):
///
/// | name | shape | init |
/// |---|---|---|
/// | `hrnn.l0.gates.w` | [F+10, 20] | N(0, 0.5/sqrt(F+10)) |
/// | `hrnn.l0.gates.b` | [20] | 2.2 |
/// | `hrnn.l0.cand.w` | [F+10, 10] | N(0, 0.5/sqrt(F+10)) |
/// | `hrnn.l0.cand.b` | [10] | 0 |
/// | `hrnn.l0.tensor_bias.w` | [20, 30] | N(0, 0.5/sqrt(20)) |
/// | `hrnn.l0.tensor_bias.b` | [30] | 0 |
/// | `hrnn.l0.global_bias.w` | [20, 30] | N(0, 0.5/sqrt(20)) |
/// | `hrnn.l0.global_bias.b` | [30] | 0 |
/// | `hrnn.l1.gates.w` | [10+F+20, 40] | N(0, 0.5/sqrt(42)) |
/// | `hrnn.l1.gates.b` | [40] | 2.2 |
/// | `hrnn.l1.cand.w` | [10+F+20, 20] | N(0, 0.5/sqrt(42)) |
/// | `hrnn.l1.cand.b` | [20] | 0 |
/// | `hrnn.l1.global_bias.w` | [20, 60] | N(0, 0.5/sqrt(20)) |
/// | `hrnn.l1.global_bias.b` | [60] | 0 |
/// | `hrnn.l2.gates.w` | [40, 40] | N(0, 0.5/sqrt(40)) |
/// | `hrnn.l2.gates.b` | [40] | 2.2 |
/// | `hrnn.l2.cand.w` | [40, 20] | N(0, 0.5/sqrt(40)) |
/// | `hrnn.l2.cand.b` | [20] | 0 |
/// | `hrnn.init.l0` / `.l1` / `.l2` | [1, 10] / [1, 20] / [1, 20] | U(-1, 1) |
/// | `hrnn.update.w` | [10, 1] | N(0, 0.5/sqrt(10)) |
/// | `hrnn.shortcut.w` (shortcut on) | [4, 1] | N(1/4, 0.1/sqrt(4)) |
/// | `hrnn.scl_decay.w`, `.b` (learnable decay) | [10, 1], [1] | N(0, 0.5/sqrt(10)), 3.2 |
/// | `hrnn.inp_decay.w`, `.b` (learnable, > 1 scale) | [10, 1], [1] | N(0, 0.5/sqrt(10)), 2.2 |
/// | `hrnn.lr.w`, `.b` (dynamic output scale) | [10, 1], [1] | 0, 0 |
/// | `hrnn.lr_momentum_logit` (dyn.) | [] | 3.2 |
/// | `hrnn.param_stepsize_offset` (dyn.) | [] | -1 |
///
/// **Choice:** the original's cell affines concatenate `[input, state]`
/// before one matrix, so the "fan_in" of the N(0, scale/sqrt(fan_in))
/// init is input + state size; kept. Biases of the injected-bias affines are
/// learnable and start at 0 (as `utils.affine` with `include_bias=True`).
#[derive(Clone, Debug, PartialEq)]
pub struct HrnnWeights {
    pub specs: Vec<WeightSpec>,
}

impl HrnnWeights {
    pub fn new(config: &HrnnConfig) -> Self {
        config.validate();
        let c = config;
        let [s0, s1, s2] = c.level_sizes;
        let f = c.num_features();
        let mut v: Vec<WeightSpec> = vec![];
        let mut push = |name: &str, shape: &[usize], init: WeightInit| {
            v.push(WeightSpec {
                name: format!("hrnn.{name}"),
                shape: shape.to_vec(),
                init,
            })
        };
        let normal = |mean: f64, scale: f64, fan_in: usize| WeightInit::Normal {
            mean,
            std: scale / (fan_in as f64).sqrt(),
        };
        // One BiasGRU cell: gates [in+n, 2n] (+bias 2.2), candidate [in+n, n].
        let cell = |push: &mut dyn FnMut(&str, &[usize], WeightInit),
                    lvl: usize,
                    input: usize,
                    n: usize| {
            let fan = input + n;
            push(
                &format!("l{lvl}.gates.w"),
                &[fan, 2 * n],
                normal(0.0, c.cell_scale, fan),
            );
            push(
                &format!("l{lvl}.gates.b"),
                &[2 * n],
                WeightInit::Const(c.gate_bias_init),
            );
            push(
                &format!("l{lvl}.cand.w"),
                &[fan, n],
                normal(0.0, c.cell_scale, fan),
            );
            push(&format!("l{lvl}.cand.b"), &[n], WeightInit::Const(0.0));
        };
        cell(&mut push, 0, f, s0);
        push(
            "l0.tensor_bias.w",
            &[s1, 3 * s0],
            normal(0.0, c.affine_scale, s1),
        );
        push("l0.tensor_bias.b", &[3 * s0], WeightInit::Const(0.0));
        push(
            "l0.global_bias.w",
            &[s2, 3 * s0],
            normal(0.0, c.affine_scale, s2),
        );
        push("l0.global_bias.b", &[3 * s0], WeightInit::Const(0.0));
        cell(&mut push, 1, s0 + f, s1);
        push(
            "l1.global_bias.w",
            &[s2, 3 * s1],
            normal(0.0, c.affine_scale, s2),
        );
        push("l1.global_bias.b", &[3 * s1], WeightInit::Const(0.0));
        cell(&mut push, 2, s1, s2);
        let u = WeightInit::Uniform { lo: -1.0, hi: 1.0 };
        push("init.l0", &[1, s0], u);
        push("init.l1", &[1, s1], u);
        push("init.l2", &[1, s2], u);
        let readout = normal(0.0, c.readout_scale, s0);
        push("update.w", &[s0, 1], readout);
        if c.use_gradient_shortcut {
            let ns = c.num_gradient_scales;
            push(
                "shortcut.w",
                &[ns, 1],
                normal(1.0 / ns as f64, c.shortcut_scale, ns),
            );
        }
        if c.learnable_decay {
            push("scl_decay.w", &[s0, 1], readout);
            push(
                "scl_decay.b",
                &[1],
                WeightInit::Const(c.scale_decay_bias_init),
            );
        }
        if c.learnable_inp_decay() {
            push("inp_decay.w", &[s0, 1], readout);
            push(
                "inp_decay.b",
                &[1],
                WeightInit::Const(c.inp_decay_bias_init),
            );
        }
        if c.dynamic_output_scale {
            // zero_init_lr_weights=True in the original.
            push("lr.w", &[s0, 1], WeightInit::Const(0.0));
            push("lr.b", &[1], WeightInit::Const(0.0));
            push(
                "lr_momentum_logit",
                &[],
                WeightInit::Const(c.lr_momentum_logit_init),
            );
            push(
                "param_stepsize_offset",
                &[],
                WeightInit::Const(c.param_stepsize_offset_init),
            );
        }
        HrnnWeights { specs: v }
    }

    /// Names and shapes, in order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.specs
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect()
    }

    /// Position of a weight by its full name (`hrnn.update.w`).
    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// Total number of meta-parameters.
    pub fn num_elements(&self) -> usize {
        self.specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Declare every weight as an f32 graph input named after it.
    pub fn inputs(&self, g: &mut Graph) -> Vec<NodeId> {
        self.specs
            .iter()
            .map(|s| g.input(&s.name, DType::F32, &s.shape))
            .collect()
    }

    /// Initial values, deterministic in `seed`. Each tensor draws from its own
    /// ChaCha8 stream (`seed`, stream = its index), so adding or removing one
    /// tensor does not change the others. Normals by Box-Muller in f64,
    /// rounded to f32.
    pub fn init(&self, seed: u64) -> Vec<(String, Tensor)> {
        self.specs
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let n: usize = s.shape.iter().product();
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(k as u64);
                let data: Vec<f32> = (0..n)
                    .map(|_| match s.init {
                        WeightInit::Normal { mean, std } => {
                            (mean + std * std_normal(&mut rng)) as f32
                        }
                        WeightInit::Uniform { lo, hi } => rng.random_range(lo..hi) as f32,
                        WeightInit::Const(c) => c as f32,
                    })
                    .collect();
                (s.name.clone(), Tensor::f32(&s.shape, data))
            })
            .collect()
    }
}

/// A standard normal sample by Box-Muller.
fn std_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The HierarchicalRNN optimizer for a given config.
#[derive(Clone, Debug, PartialEq)]
pub struct Hrnn {
    pub config: HrnnConfig,
}

impl Default for Hrnn {
    fn default() -> Self {
        Hrnn::new(HrnnConfig::default())
    }
}

/// Where each parameter tensor's elements sit in the packed per-element
/// state: tensor `k` (flattened row-major) occupies columns
/// `offsets[k] .. offsets[k] + sizes[k]` of every `[*, N]` state entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    pub sizes: Vec<usize>,
    pub offsets: Vec<usize>,
    /// `N`, the number of optimizee parameters.
    pub total: usize,
}

impl Packing {
    pub fn new(param_shapes: &[Vec<usize>]) -> Self {
        let sizes: Vec<usize> = param_shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .collect();
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for &n in &sizes {
            offsets.push(total);
            total += n;
        }
        Packing {
            sizes,
            offsets,
            total,
        }
    }

    /// `T`, the number of parameter tensors.
    pub fn num_tensors(&self) -> usize {
        self.sizes.len()
    }

    /// The columns of tensor `k`.
    pub fn range(&self, k: usize) -> std::ops::Range<usize> {
        self.offsets[k]..self.offsets[k] + self.sizes[k]
    }
}

/// Per-tensor reductions and broadcasts over the packed columns, as MatMuls
/// with constant one-hot matrices: `basis [T, N]` (row `k` is 1 on tensor
/// `k`'s columns), its transpose, and the element counts `[1, T]`. One MatMul
/// per reduction keeps the graph small whatever the number of tensors and
/// differentiates as any MatMul; dividing by the count (exact in f32) rather
/// than multiplying by a rounded `1/n` keeps the means exact.
struct Segments {
    basis: NodeId,
    basis_t: NodeId,
    counts: NodeId,
}

impl Segments {
    fn new(g: &mut Graph, p: &Packing) -> Self {
        let (t, n) = (p.num_tensors(), p.total);
        let mut basis = vec![0f32; t * n];
        let mut basis_t = vec![0f32; n * t];
        for k in 0..t {
            for j in p.range(k) {
                basis[k * n + j] = 1.0;
                basis_t[j * t + k] = 1.0;
            }
        }
        let counts = p.sizes.iter().map(|&c| c as f32).collect();
        Segments {
            basis: g.constant(Tensor::f32(&[t, n], basis)),
            basis_t: g.constant(Tensor::f32(&[n, t], basis_t)),
            counts: g.constant(Tensor::f32(&[1, t], counts)),
        }
    }

    /// `[c, N] -> [c, T]`: the mean over each tensor's columns.
    fn mean(&self, g: &mut Graph, x: NodeId) -> NodeId {
        let total = g.matmul(x, self.basis_t);
        g.div(total, self.counts)
    }

    /// `[c, T] -> [c, N]`: each tensor's column repeated over its elements.
    fn expand(&self, g: &mut Graph, y: NodeId) -> NodeId {
        g.matmul(y, self.basis)
    }
}

/// Positions of the state entries in the state list.
#[derive(Clone, Copy, Debug)]
struct Slots {
    h0: usize,
    accum: usize,
    ms: usize,
    inp_decay: usize,
    scl_decay: usize,
    log_lr: Option<usize>,
    h1: usize,
    h2: usize,
}

impl Hrnn {
    pub fn new(config: HrnnConfig) -> Self {
        config.validate();
        Hrnn { config }
    }

    /// The meta-parameter list.
    pub fn weights(&self) -> HrnnWeights {
        HrnnWeights::new(&self.config)
    }

    fn slots(&self) -> Slots {
        let dynamic = self.config.dynamic_output_scale;
        let log_lr = dynamic.then_some(5);
        let h1 = 5 + usize::from(dynamic);
        Slots {
            h0: 0,
            accum: 1,
            ms: 2,
            inp_decay: 3,
            scl_decay: 4,
            log_lr,
            h1,
            h2: h1 + 1,
        }
    }

    /// Names and shapes of the optimizer state for parameter tensors of the
    /// given shapes. The state is feature-major and packed: one column per
    /// optimizee parameter, all tensors' elements one after the other in
    /// parameter order, each tensor flattened row-major ([`Packing`]), `N`
    /// columns in all; `T` = number of tensors, `S` = number of gradient
    /// scales:
    ///
    /// * `hrnn.state.h0` `[10, N]`: level-0 hidden state per element;
    /// * `hrnn.state.accum` `[S, N]`: gradient accumulators, one row per scale;
    /// * `hrnn.state.ms` `[S, N]`: their mean squares;
    /// * `hrnn.state.inp_decay` `[1, N]`, `hrnn.state.scl_decay` `[1, N]`;
    /// * `hrnn.state.log_lr` `[1, N]` (with dynamic output scale);
    /// * `hrnn.state.h1` `[20, T]`: level-1 hidden state, one column per tensor;
    /// * `hrnn.state.h2` `[20, 1]`: the global hidden state.
    ///
    /// There are no scalar states (the original has no step counter).
    ///
    /// **Choice:** packing and orientation are a layout, not a change of the
    /// math: every per-tensor quantity of the original (level-1 input,
    /// output RMS, relative lr) is still computed per tensor, over its own
    /// columns. Packing keeps the number of nodes independent of the number
    /// of tensors; feature-major rows make every broadcast a
    /// broadcast of a long contiguous row, the fast case of ONNX Runtime's
    /// CPU kernels (a `[N, 1] x [N, 4]` broadcast is ~10x slower there).
    pub fn state_specs(&self, param_shapes: &[Vec<usize>]) -> Vec<(String, Vec<usize>)> {
        let [s0, s1, s2] = self.config.level_sizes;
        let p = Packing::new(param_shapes);
        let (n, t, ns) = (p.total, p.num_tensors(), self.config.num_gradient_scales);
        let mut v = vec![
            ("hrnn.state.h0".to_string(), vec![s0, n]),
            ("hrnn.state.accum".to_string(), vec![ns, n]),
            ("hrnn.state.ms".to_string(), vec![ns, n]),
            ("hrnn.state.inp_decay".to_string(), vec![1, n]),
            ("hrnn.state.scl_decay".to_string(), vec![1, n]),
        ];
        if self.config.dynamic_output_scale {
            v.push(("hrnn.state.log_lr".to_string(), vec![1, n]));
        }
        v.push(("hrnn.state.h1".to_string(), vec![s1, t]));
        v.push(("hrnn.state.h2".to_string(), vec![s2, 1]));
        v
    }

    /// Declare the state as f32 graph inputs named per [`Hrnn::state_specs`].
    pub fn state_inputs(&self, g: &mut Graph, param_shapes: &[Vec<usize>]) -> Vec<NodeId> {
        self.state_specs(param_shapes)
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect()
    }

    /// How the initial state is drawn from a seed (what an L2O bundle
    /// carries, `meta.l2o.init.state`): zeros, but the per-element log
    /// learning rates: per tensor `k` (stream `k`) an offset
    /// `o ~ U[ln(lo)/2, ln(hi)/2)` of `init_lr_range = (lo, hi)`, then per
    /// element `U[ln(lo)/2, ln(hi)/2) + o`, clamped to
    /// `[MIN_LOG_LR, max_log_lr]`.
    pub fn initial_state_rules(&self, param_shapes: &[Vec<usize>]) -> Vec<TensorInit> {
        let (lo, hi) = self.config.init_lr_range;
        let p = Packing::new(param_shapes);
        let log_lr = self.slots().log_lr;
        self.state_specs(param_shapes)
            .iter()
            .enumerate()
            .map(|(k, (n, s))| {
                let rule = if Some(k) == log_lr {
                    InitRule::SegmentedUniform {
                        lo: lo.ln() / 2.0,
                        hi: hi.ln() / 2.0,
                        min: MIN_LOG_LR,
                        max: self.config.max_log_lr,
                        segments: p.sizes.clone(),
                    }
                } else {
                    InitRule::Constant { value: 0.0 }
                };
                TensorInit::new(n, s, rule)
            })
            .collect()
    }

    /// Host initial state, deterministic in `seed`: accumulators, mean
    /// squares and both decays 0; hidden states 0 (placeholders: apply
    /// [`Hrnn::reset_hidden`] in the graph of the first unroll, or use
    /// [`Hrnn::initial_state_with_weights`]); per-element log learning rates
    /// `U(log(min)/2, log(max)/2) + offset`, `offset ~ U(log(min)/2,
    /// log(max)/2)`, clipped to `[-33, max_log_lr]`.
    ///
    /// **Choice:** one offset per parameter tensor, as in the original
    /// (`_initialize_state` runs once per variable). Tensor `k` draws from
    /// ChaCha8 stream `k` of `seed`: first its offset, then its elements.
    /// With the default range both terms lie in [-6.9, -2.3], so the initial
    /// log lr is in [-13.8, -4.6] (about e^-9 on average).
    pub fn initial_state(&self, param_shapes: &[Vec<usize>], seed: u64) -> Vec<(String, Tensor)> {
        draw_all(&self.initial_state_rules(param_shapes), seed)
    }

    /// [`Hrnn::initial_state`] with the hidden states set from the values of
    /// `hrnn.init.l{0,1,2}` in `weights` (broadcast over elements and
    /// tensors), as the original's reset does. Not differentiable (host
    /// values).
    pub fn initial_state_with_weights(
        &self,
        param_shapes: &[Vec<usize>],
        weights: &[(String, Tensor)],
        seed: u64,
    ) -> Vec<(String, Tensor)> {
        let get = |name: &str| -> Vec<f32> {
            weights
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("initial_state_with_weights: no weight '{name}'"))
                .1
                .as_f32()
                .expect("f32 weight")
                .to_vec()
        };
        let mut st = self.initial_state(param_shapes, seed);
        let sl = self.slots();
        for (slot, init) in [
            (sl.h0, "hrnn.init.l0"),
            (sl.h1, "hrnn.init.l1"),
            (sl.h2, "hrnn.init.l2"),
        ] {
            let v = get(init);
            let s = st[slot].1.shape.clone();
            // Unit u is row u: the init value repeated over the columns.
            let rows = v
                .iter()
                .flat_map(|&x| std::iter::repeat_n(x, s[1]))
                .collect();
            st[slot].1 = Tensor::f32(&s, rows);
        }
        st
    }

    /// In-graph reset of the hidden states: returns `state` with `h0`
    /// replaced by the learnable `hrnn.init.l0` broadcast over the elements,
    /// `h1` by `hrnn.init.l1` broadcast over the tensors and `h2` by
    /// `hrnn.init.l2` (differentiably, so the meta-gradient reaches the init
    /// vectors). Use on the first unroll of a problem.
    pub fn reset_hidden(&self, g: &mut Graph, w: &[NodeId], state: &[NodeId]) -> Vec<NodeId> {
        let ws = self.weights();
        let wi = |name: &str| w[ws.index(name).expect("weight")];
        let sl = self.slots();
        assert_eq!(
            state.len(),
            sl.h2 + 1,
            "Hrnn::reset_hidden: a state list of {} entries does not match the layout",
            state.len()
        );
        let mut out = state.to_vec();
        for (slot, init) in [
            (sl.h0, "hrnn.init.l0"),
            (sl.h1, "hrnn.init.l1"),
            (sl.h2, "hrnn.init.l2"),
        ] {
            let s = g.shape(state[slot]).to_vec();
            let col = g.reshape(wi(init), &[s[0], 1]);
            out[slot] = if s[1] == 1 { col } else { g.expand(col, &s) };
        }
        out
    }

    /// Check the weights, parameters, gradients and state against the
    /// layout; returns the parameter shapes.
    fn check_step_inputs(
        &self,
        g: &Graph,
        w: &[NodeId],
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
    ) -> Vec<Vec<usize>> {
        let ws = self.weights();
        assert_eq!(
            w.len(),
            ws.specs.len(),
            "Hrnn::step: expected {} weights",
            ws.specs.len()
        );
        for (id, s) in w.iter().zip(&ws.specs) {
            assert_eq!(
                g.shape(*id),
                s.shape.as_slice(),
                "Hrnn::step: weight {} has the wrong shape",
                s.name
            );
        }
        assert_eq!(
            params.len(),
            grads.len(),
            "Hrnn::step: params and grads differ in length"
        );
        assert!(!params.is_empty(), "Hrnn::step: no parameter tensors");
        for (k, (&p, &gr)) in params.iter().zip(grads).enumerate() {
            assert_eq!(
                g.shape(p),
                g.shape(gr),
                "Hrnn::step: grad {k} does not match its parameter"
            );
        }
        let shapes: Vec<Vec<usize>> = params.iter().map(|&p| g.shape(p).to_vec()).collect();
        let specs = self.state_specs(&shapes);
        assert_eq!(
            state.len(),
            specs.len(),
            "Hrnn::step: expected {} state tensors",
            specs.len()
        );
        for (id, (n, s)) in state.iter().zip(&specs) {
            assert_eq!(
                g.shape(*id),
                s.as_slice(),
                "Hrnn::step: state {n} has the wrong shape"
            );
        }
        shapes
    }

    /// One optimizer step.
    ///
    /// * `w`: the meta-parameters in [`HrnnWeights`] order;
    /// * `params`, `grads`: the optimizee's parameter tensors and their
    ///   gradients (same shapes, any rank);
    /// * `state`: in [`Hrnn::state_specs`] order for `params`' shapes;
    /// * `objective`: unused (the original HierarchicalRNN does not read the
    ///   objective in its step; attention is off). Kept for a uniform calling
    ///   convention with optimizers that do.
    ///
    /// Returns the new parameters and the new state (same order as `state`).
    ///
    /// The step does not cut the gradient through `grads`: pass
    /// `g.stop_gradient(grad)` for `use_second_derivatives = False`.
    ///
    /// **Choices:**
    /// * The first-step rule for `ms`: the original replaces the scale decay
    ///   by 0 for a variable whose old `ms` is all zero
    ///   (`tf.reduce_all(tf.equal(ms, 0.))`, per variable and scale). Here the
    ///   test is per scale over all tensors. The two agree on every state a
    ///   run reaches: `ms` starts at 0 everywhere, and after the first update
    ///   every element is at least `(1 - s) * 1e-12 > 0`, or keeps its old
    ///   positive value when `s` rounds to 1.
    /// * The clip of the step log lr is straight-through:
    ///   `x + StopGradient(clip(x, -33, max_log_lr) - x)`, as in the original.
    /// * The dynamic output scale divides by the RMS of the update direction
    ///   over the tensor (`sqrt(mean(delta^2) + 1e-16)`), gradient included.
    /// * All tensors share the same weights (the original's `PerTensor`
    ///   variable scope with reuse).
    /// * The decays of the scales are `d_{i+1} = sqrt(d_i)` with `d_0` the
    ///   `inp_decay` state, which starts at 0 where `sqrt` has an infinite
    ///   derivative. No derivative flows there unless the *state* is
    ///   differentiated (truncated BPTT never differentiates the state an
    ///   unroll starts from; inside an unroll `inp_decay` is a sigmoid > 0);
    ///   differentiating with respect to a zero `inp_decay` gives inf/NaN.
    pub fn step(
        &self,
        g: &mut Graph,
        w: &[NodeId],
        params: &[NodeId],
        grads: &[NodeId],
        state: &[NodeId],
        objective: NodeId,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let _ = objective;
        let c = &self.config;
        let shapes = self.check_step_inputs(g, w, params, grads, state);
        let ws = self.weights();
        let wi = |name: &str| -> NodeId {
            w[ws.index(&format!("hrnn.{name}"))
                .unwrap_or_else(|| panic!("weight {name}"))]
        };
        let wo = |name: &str| -> Option<NodeId> { ws.index(&format!("hrnn.{name}")).map(|i| w[i]) };

        let packing = Packing::new(&shapes);
        let seg = Segments::new(g, &packing);
        let (n, t) = (packing.total, packing.num_tensors());
        let sl = self.slots();
        let mut new_state = state.to_vec();
        let ns = c.num_gradient_scales;
        let [s0, s1, s2] = c.level_sizes;
        let zero = g.scalar(0.0);
        let one = g.scalar(1.0);

        // The gradients, packed: [1, N].
        let flat: Vec<NodeId> = grads
            .iter()
            .zip(&packing.sizes)
            .map(|(&gr, &k)| g.reshape(gr, &[1, k]))
            .collect();
        let grad = concat_or_single(g, &flat, 1);

        // ---- features ------------------------------------------------------
        // Decays of the scales, one row each: d_{i+1} = sqrt(d_i).
        let mut decays = vec![state[sl.inp_decay]];
        for i in 1..ns {
            let d = g.sqrt(decays[i - 1]);
            decays.push(d);
        }
        let decay = concat_or_single(g, &decays, 0);
        let accum = if ns == 1 {
            grad
        } else {
            let om = g.sub(one, decay);
            let a = g.mul(grad, om);
            let b = g.mul(state[sl.accum], decay);
            g.add(a, b)
        };
        new_state[sl.accum] = accum;
        // ms_i = (1 - s) (accum_i^2 + 1e-12) + s ms_i, with s forced to 0 on
        // the first step (all ms_i zero): s = keep_i * scl_decay, an outer
        // product of [S, 1] and [1, N].
        let ms_old = state[sl.ms];
        let abs = g.abs(ms_old);
        let mx = g.reduce_max(abs, &[1], true);
        let all_zero = g.equal(mx, zero);
        let keep = g.where_(all_zero, zero, one);
        let s = g.matmul(keep, state[sl.scl_decay]);
        let sq = g.square(accum);
        let sq = g.add_scalar(sq, MS_EPS);
        let oms = g.sub(one, s);
        let a = g.mul(oms, sq);
        let b = g.mul(s, ms_old);
        let ms = g.add(a, b);
        new_state[sl.ms] = ms;
        let mse = g.add_scalar(ms, EPS16);
        let rms = g.sqrt(mse);
        let q = g.div(accum, rms);
        let gs = g.asinh(q);
        let mut feats = vec![gs];
        if c.use_grad_products && ns > 1 {
            let lo = g.slice(gs, 0, 0, ns - 1);
            let hi = g.slice(gs, 0, 1, ns);
            feats.push(g.mul(lo, hi));
        }
        if c.use_log_means_squared {
            let l = g.log(mse);
            let avg = g.mean(l, &[0], true);
            feats.push(g.sub(l, avg));
        }
        if c.use_relative_lr {
            let l = state[sl.log_lr.expect("log_lr")];
            let mean = if c.use_problem_lr_mean {
                g.mean_all(l)
            } else {
                let m = seg.mean(g, l);
                seg.expand(g, m)
            };
            feats.push(g.sub(l, mean));
        }
        let x = concat_or_single(g, &feats, 0);

        // ---- level 0 and level 1 -------------------------------------------
        // Injected biases from the OLD level-1 and global states, as columns.
        let h2_old = state[sl.h2];
        let h1_old = state[sl.h1];
        let gbias0 = affine(
            g,
            wi("l0.global_bias.w"),
            h2_old,
            Some(wi("l0.global_bias.b")),
        );
        let gbias1 = affine(
            g,
            wi("l1.global_bias.w"),
            h2_old,
            Some(wi("l1.global_bias.b")),
        );
        let tb = affine(
            g,
            wi("l0.tensor_bias.w"),
            h1_old,
            Some(wi("l0.tensor_bias.b")),
        );
        let bias0 = g.add(tb, gbias0);
        let h0_new = bias_gru(
            g,
            x,
            state[sl.h0],
            Some(bias0),
            seg.basis,
            &CellWeights::of(&wi, 0),
            s0,
        );
        new_state[sl.h0] = h0_new;
        let cat = g.concat(&[h0_new, x], 0);
        let l1_in = seg.mean(g, cat);
        let ones_t = g.fill(1.0, DType::F32, &[1, t]);
        let h1_new = bias_gru(
            g,
            l1_in,
            h1_old,
            Some(gbias1),
            ones_t,
            &CellWeights::of(&wi, 1),
            s1,
        );
        new_state[sl.h1] = h1_new;

        // ---- readouts ------------------------------------------------------
        // The update direction and the decay / lr readouts as one MatMul on
        // h0 (rows: update, then each present readout).
        let mut readouts: Vec<(NodeId, Option<NodeId>)> = vec![(wi("update.w"), None)];
        let names = ["scl_decay", "inp_decay", "lr"];
        let present: Vec<&str> = names
            .iter()
            .copied()
            .filter(|r| wo(&format!("{r}.w")).is_some())
            .collect();
        for r in &present {
            readouts.push((wi(&format!("{r}.w")), Some(wi(&format!("{r}.b")))));
        }
        let rows: Vec<NodeId> = readouts
            .iter()
            .map(|&(w, _)| g.transpose(w, &[1, 0]))
            .collect();
        let wr = g.concat(&rows, 0);
        let biases: Vec<NodeId> = readouts
            .iter()
            .map(|&(_, b)| match b {
                Some(b) => g.reshape(b, &[1, 1]),
                None => g.zeros(&[1, 1]),
            })
            .collect();
        let br = g.concat(&biases, 0);
        let br = g.expand(br, &[readouts.len(), t]);
        let wr = g.concat(&[wr, br], 1);
        let h0e = g.concat(&[h0_new, seg.basis], 0);
        let out = g.matmul(wr, h0e);
        let readout = |g: &mut Graph, i: usize| g.slice(out, 0, i, i + 1);
        let mut delta = readout(g, 0);
        let readout_of = |g: &mut Graph, name: &str| {
            present
                .iter()
                .position(|r| *r == name)
                .map(|i| readout(g, i + 1))
        };
        let scl_z = readout_of(g, "scl_decay");
        let inp_z = readout_of(g, "inp_decay");
        let lr_change = readout_of(g, "lr");
        if let Some(sw) = wo("shortcut.w") {
            let swt = g.transpose(sw, &[1, 0]);
            let sc = g.matmul(swt, gs);
            delta = g.add(delta, sc);
        }
        if c.dynamic_output_scale {
            let d2 = g.square(delta);
            let m = seg.mean(g, d2);
            let m = g.add_scalar(m, EPS16);
            let denom = g.sqrt(m);
            let denom = seg.expand(g, denom);
            delta = g.div(delta, denom);
        }
        new_state[sl.scl_decay] = match scl_z {
            Some(z) => g.sigmoid(z),
            // Original: sigmoid(h . 0 + log(0.93 / 0.07)) = 0.93.
            None => g.fill(0.93, DType::F32, &[1, n]),
        };
        new_state[sl.inp_decay] = match inp_z {
            Some(z) => g.sigmoid(z),
            // Original: sigmoid(h . 0 + log(0.89 / 0.11)) = 0.89.
            None => g.fill(0.89, DType::F32, &[1, n]),
        };
        let step_vec = if let Some(slot) = sl.log_lr {
            let log_lr = state[slot];
            let change = lr_change.expect("lr readout");
            let raw = g.add(log_lr, change);
            let step_log_lr = straight_through_clip(g, raw, MIN_LOG_LR as f32, c.max_log_lr as f32);
            let lrm = g.sigmoid(wi("lr_momentum_logit"));
            let a = g.mul(lrm, log_lr);
            let olrm = g.sub(one, lrm);
            let b = g.mul(olrm, step_log_lr);
            new_state[slot] = g.add(a, b);
            let e = g.add(step_log_lr, wi("param_stepsize_offset"));
            let lr = g.exp(e);
            g.mul(lr, delta)
        } else {
            // lr_param = 2 * sigmoid(h . 0 + 0) = 1 in the original.
            delta
        };
        let new_params = params
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                let cols = if t == 1 {
                    step_vec
                } else {
                    let r = packing.range(k);
                    g.slice(step_vec, 1, r.start, r.end)
                };
                let upd = g.reshape(cols, &shapes[k]);
                g.sub(p, upd)
            })
            .collect();

        // ---- level 2 -------------------------------------------------------
        let l2_in = match c.level2_input {
            Level2Input::LastTensor if t == 1 => h1_new,
            Level2Input::LastTensor => g.slice(h1_new, 1, t - 1, t),
            Level2Input::MeanOverTensors => g.mean(h1_new, &[1], true),
        };
        let one_col = g.fill(1.0, DType::F32, &[1, 1]);
        new_state[sl.h2] = bias_gru(
            g,
            l2_in,
            h2_old,
            None,
            one_col,
            &CellWeights::of(&wi, 2),
            s2,
        );
        (new_params, new_state)
    }
}

/// Concatenation, without a node for a single part.
fn concat_or_single(g: &mut Graph, parts: &[NodeId], axis: usize) -> NodeId {
    if parts.len() == 1 {
        parts[0]
    } else {
        g.concat(parts, axis)
    }
}

/// Feature-major affine map `W^T x (+ b)`: `w [in, out]` (the weights'
/// stored orientation), `x [in, M]`, `b [out]` broadcast over the columns.
fn affine(g: &mut Graph, w: NodeId, x: NodeId, b: Option<NodeId>) -> NodeId {
    let wt = g.transpose(w, &[1, 0]);
    let y = g.matmul(wt, x);
    match b {
        Some(b) => {
            let out = g.shape(wt)[0];
            let col = g.reshape(b, &[out, 1]);
            g.add(y, col)
        }
        None => y,
    }
}

/// `clip(x, lo, hi)` in value, identity in gradient:
/// `x + StopGradient(clip(x) - x)`.
pub fn straight_through_clip(g: &mut Graph, x: NodeId, lo: f32, hi: f32) -> NodeId {
    let l = g.scalar(lo);
    let h = g.scalar(hi);
    let a = g.max(x, l);
    let clipped = g.min(a, h);
    let d = g.sub(clipped, x);
    let d = g.stop_gradient(d);
    g.add(x, d)
}

struct CellWeights {
    gates_w: NodeId,
    gates_b: NodeId,
    cand_w: NodeId,
    cand_b: NodeId,
}

impl CellWeights {
    fn of(wi: &dyn Fn(&str) -> NodeId, lvl: usize) -> Self {
        CellWeights {
            gates_w: wi(&format!("l{lvl}.gates.w")),
            gates_b: wi(&format!("l{lvl}.gates.b")),
            cand_w: wi(&format!("l{lvl}.cand.w")),
            cand_b: wi(&format!("l{lvl}.cand.b")),
        }
    }
}

/// The BiasGRU cell of `rnn_cells.py`, feature-major: `x [in, M]`,
/// `h [n, M]`, injected bias `[3n, K]` (r / u / c parts as row blocks), one
/// column per group of columns of `x`, given by `basis [K, M]` (one-hot
/// groups; `None` bias: `K = 1` and `basis` all ones).
///
/// `r, u = sigmoid(Wg^T [x; h] + bg + bias[r|u])`,
/// `c = tanh(Wc^T [x; r*h] + bc + bias[c])`, `h' = u*h + (1-u)*c`.
///
/// The biases ride in the MatMuls: `[Wg^T | B] . [x; h; basis]`, so no
/// `[3n, M]` bias tensor is ever broadcast.
fn bias_gru(
    g: &mut Graph,
    x: NodeId,
    h: NodeId,
    bias: Option<NodeId>,
    basis: NodeId,
    cw: &CellWeights,
    n: usize,
) -> NodeId {
    let gb = g.reshape(cw.gates_b, &[2 * n, 1]);
    let cb = g.reshape(cw.cand_b, &[n, 1]);
    let cell_b = g.concat(&[gb, cb], 0);
    let b = match bias {
        Some(b) => g.add(b, cell_b),
        None => cell_b,
    };
    let b_ru = g.slice(b, 0, 0, 2 * n);
    let b_c = g.slice(b, 0, 2 * n, 3 * n);

    let wgt = g.transpose(cw.gates_w, &[1, 0]);
    let wg = g.concat(&[wgt, b_ru], 1);
    let xh = g.concat(&[x, h, basis], 0);
    let gates = g.matmul(wg, xh);
    let r_lin = g.slice(gates, 0, 0, n);
    let u_lin = g.slice(gates, 0, n, 2 * n);
    let r = g.sigmoid(r_lin);
    let u = g.sigmoid(u_lin);
    let rh = g.mul(r, h);
    let wct = g.transpose(cw.cand_w, &[1, 0]);
    let wc = g.concat(&[wct, b_c], 1);
    let xrh = g.concat(&[x, rh, basis], 0);
    let cand = g.matmul(wc, xrh);
    let c = g.tanh(cand);
    // u h + (1 - u) c = c + u (h - c)
    let hc = g.sub(h, c);
    let uhc = g.mul(u, hc);
    g.add(c, uhc)
}
