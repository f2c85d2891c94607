//! The optimizee problem set for learned-optimizer training and meta-testing.
//!
//! A learned optimizer sees only a list of parameter tensors, a scalar
//! minibatch loss and its gradients; the runtime supplies the batches. A
//! [`Problem`] describes exactly that: the parameter shapes and their initial
//! values, the batch inputs the runtime must feed, and the loss as a graph
//! built on the builder (plus, for classifiers, the minibatch accuracy).
//!
//! | name | parameters | batch | init |
//! | --- | --- | --- | --- |
//! | `mnist-mlp` | 784-20-10 sigmoid MLP, 15,910 | MNIST `x f32[B,784]`, `y i64[B]` | fan-in normal |
//! | `mnist-mlp-relu` | 784-20-10 ReLU MLP, 15,910 | MNIST | fan-in normal |
//! | `mnist-mlp-deep` | 784-20-20-10 sigmoid MLP, 16,330 | MNIST | fan-in normal |
//! | `mnist-convnet` | conv3x3/8/s2 -> conv3x3/16/s2 -> linear 10, 9,098 | MNIST | fan-in normal |
//! | `quadratic` | `x[20]` of `1/2‖Wx-y‖²`, 20 | none | N(0,1) |
//! | `rosenbrock` | `x[2]`, 2 | none | (-1.2, 1) + N(0, 0.1²) |
//! | `beale` | `x[2]`, 2 | none | (1, 1) + N(0, 0.1²) |
//! | `booth` | `x[2]`, 2 | none | (0, 0) + N(0, 0.1²) |
//! | `matyas` | `x[2]`, 2 | none | (5, 3) + N(0, 0.1²) |
//! | `styblinski-tang` | `x[10]`, 10 | none | N(0,1) |
//! | `softmax-regression-random` | `w[20,10]`, `b[10]`, 210 | none | w N(0, 0.01²), b 0 |
//! | `logsumexp` | `x[10]` of `logsumexp([A0;-A0]x+b)`, 10 | none | N(0,1) |
//!
//! **Fan-in normal** (the MNIST networks): every weight element is
//! `N(0, 1) * 1.2 / sqrt(fan_in)` (the L2O problem generator's
//! `1.2/sqrt(fan_in)` scaling; fan-in = rows of an `[in, out]` matrix, and
//! `C*kh*kw` for an OIHW conv kernel); biases are zero.
//!
//! **Determinism**: parameter `i` of a problem is drawn from a ChaCha8
//! stream seeded with the init seed, stream number `i` ([`SeededRng`]); the
//! normals come from Box-Muller. So `init_params(seed)` is the same on every
//! platform and run, and one parameter's values do not depend on the others'
//! shapes. The data baked into the synthetic problems (quadratic `W`, `y`;
//! softmax-regression examples; logsumexp `A0`, `b`) is drawn from the fixed
//! [`synthetic::DATA_SEED`] and never from the init seed.

use std::collections::HashMap;
use std::path::Path;

use metac_graphs::onnx::ImportedModel;
use metac_graphs::passes::dce::live_nodes;
use metac_graphs::{DType, Graph, NodeId, Op, Tensor};

use super::convnet::ConvNet;
use super::mlp::{Activation, Mlp};
use super::synthetic::{self, Synthetic};

// ---- randomness ---------------------------------------------------------------

pub use metac_contract::init::SeededRng;
use metac_contract::init::{InitRule, TensorInit};

/// The fan-in normal rules: `N(0,1) * 1.2 / sqrt(fan_in)` for weights
/// (rank >= 2), parameter `i` drawn from stream `i` of the seed, and zeros
/// for biases (rank 1).
pub fn fan_in_normal_rules(shapes: &[(String, Vec<usize>)], fan_ins: &[usize]) -> Vec<TensorInit> {
    shapes
        .iter()
        .zip(fan_ins)
        .enumerate()
        .map(|(i, ((n, s), &fan))| {
            let rule = if s.len() < 2 {
                InitRule::Constant { value: 0.0 }
            } else {
                InitRule::Normal {
                    std: 1.2 / (fan as f64).sqrt(),
                    stream: i as u64,
                }
            };
            TensorInit::new(n, s, rule)
        })
        .collect()
}

/// [`fan_in_normal_rules`] drawn for `seed`.
pub fn fan_in_normal_init(
    shapes: &[(String, Vec<usize>)],
    fan_ins: &[usize],
    seed: u64,
) -> Vec<Tensor> {
    fan_in_normal_rules(shapes, fan_ins)
        .iter()
        .map(|r| r.draw(seed))
        .collect()
}

// ---- the trait ----------------------------------------------------------------

pub use metac_contract::l2o::DataKind;

/// An optimizee: parameters, batch inputs and a scalar loss graph.
pub trait Problem: Send + Sync {
    fn name(&self) -> &str;

    /// Names and shapes of the parameter tensors (all f32), in order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// How initial parameter values are drawn from a seed, in the order of
    /// [`Problem::param_shapes`]: what an L2O bundle carries so that the
    /// runtime draws fresh problems without the compiler. `None` for
    /// problems whose values are not drawn (an ONNX model's initializers).
    fn init_rules(&self) -> Option<Vec<TensorInit>>;

    /// Deterministic initial parameter values for `seed`, in the order of
    /// [`Problem::param_shapes`] (by default [`Problem::init_rules`] drawn).
    fn init_params(&self, seed: u64) -> Vec<Tensor> {
        self.init_rules()
            .expect("a problem without init rules overrides init_params")
            .iter()
            .map(|r| r.draw(seed))
            .collect()
    }

    /// Names, dtypes and shapes of the inputs the runtime feeds per step
    /// (empty for problems with baked data).
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)>;

    /// The scalar f32 loss; `params` and `batch` are nodes of the shapes of
    /// [`Problem::param_shapes`] and [`Problem::batch_inputs`].
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId;

    /// [`Problem::loss`] computed with the examples as columns, where the
    /// problem has such a form (see `Mlp::loss_by_columns`): the form for
    /// the large objective set.
    fn loss_by_columns(
        &self,
        _g: &mut Graph,
        _params: &[NodeId],
        _batch: &[NodeId],
    ) -> Option<NodeId> {
        None
    }

    /// For classifiers: the fraction of the batch classified correctly (a
    /// scalar f32; not differentiable).
    fn accuracy(&self, _g: &mut Graph, _params: &[NodeId], _batch: &[NodeId]) -> Option<NodeId> {
        None
    }

    /// The data set the runtime must draw batches from, if any.
    fn needs_data(&self) -> Option<DataKind> {
        None
    }

    /// The global minimiser and the minimum loss, where known exactly.
    fn known_minimum(&self) -> Option<(Vec<Tensor>, f64)> {
        None
    }

    /// Total number of parameter elements.
    fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Declare the parameters and then the batch inputs as graph inputs,
    /// under their own names.
    fn declare_inputs(&self, g: &mut Graph) -> (Vec<NodeId>, Vec<NodeId>) {
        let params = self
            .param_shapes()
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect();
        let batch = self
            .batch_inputs()
            .iter()
            .map(|(n, d, s)| g.input(n, *d, s))
            .collect();
        (params, batch)
    }

    /// A graph with the parameters and batch inputs as inputs and outputs
    /// `loss` and, for classifiers, `accuracy`.
    fn loss_graph(&self) -> Graph {
        let mut g = Graph::new();
        let (p, b) = self.declare_inputs(&mut g);
        let loss = self.loss(&mut g, &p, &b);
        g.output("loss", loss);
        if let Some(acc) = self.accuracy(&mut g, &p, &b) {
            g.output("accuracy", acc);
        }
        g
    }
}

/// Fraction of rows of `logits[N, C]` whose largest logit is at the i64
/// label (a tie for the maximum counts as correct). There is no argmax op:
/// the logits are compared with their row maximum.
pub fn accuracy(g: &mut Graph, logits: NodeId, labels: NodeId) -> NodeId {
    let s = g.shape(logits).to_vec();
    let logits = g.stop_gradient(logits);
    let rowmax = g.reduce_max(logits, &[1], true);
    let is_max = g.equal(logits, rowmax);
    let is_max = g.cast(is_max, DType::F32);
    let onehot = g.one_hot(labels, s[1]);
    let hit = g.mul(is_max, onehot);
    let hits = g.sum_all(hit);
    g.mul_scalar(hits, 1.0 / s[0] as f32)
}

fn mnist_batch(batch: usize) -> Vec<(String, DType, Vec<usize>)> {
    vec![
        ("x".into(), DType::F32, vec![batch, 784]),
        ("y".into(), DType::I64, vec![batch]),
    ]
}

// ---- MNIST problems -------------------------------------------------------------

/// An MLP on MNIST minibatches.
pub struct MlpProblem {
    pub name: String,
    pub mlp: Mlp,
    pub batch: usize,
}

impl Problem for MlpProblem {
    fn name(&self) -> &str {
        &self.name
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.mlp.param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        let fans: Vec<usize> = self
            .mlp
            .sizes
            .windows(2)
            .flat_map(|w| [w[0], w[0]])
            .collect();
        Some(fan_in_normal_rules(&self.param_shapes(), &fans))
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        mnist_batch(self.batch)
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        self.mlp.loss(g, params, batch[0], batch[1])
    }
    fn loss_by_columns(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        batch: &[NodeId],
    ) -> Option<NodeId> {
        Some(self.mlp.loss_by_columns(g, params, batch[0], batch[1]))
    }
    fn accuracy(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> Option<NodeId> {
        let logits = self.mlp.logits(g, params, batch[0]);
        Some(accuracy(g, logits, batch[1]))
    }
    fn needs_data(&self) -> Option<DataKind> {
        Some(DataKind::Mnist)
    }
}

/// A ConvNet on MNIST minibatches (flattened `[B,784]` images).
pub struct ConvNetProblem {
    pub name: String,
    pub net: ConvNet,
    pub batch: usize,
}

impl Problem for ConvNetProblem {
    fn name(&self) -> &str {
        &self.name
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.net.param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        Some(fan_in_normal_rules(
            &self.param_shapes(),
            &self.net.fan_ins(),
        ))
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        mnist_batch(self.batch)
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        self.net.loss(g, params, batch[0], batch[1])
    }
    fn accuracy(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> Option<NodeId> {
        let logits = self.net.logits(g, params, batch[0]);
        Some(accuracy(g, logits, batch[1]))
    }
    fn needs_data(&self) -> Option<DataKind> {
        Some(DataKind::Mnist)
    }
}

// ---- synthetic problems -------------------------------------------------------

/// A synthetic problem (see [`Synthetic`]): no batch inputs.
pub struct SyntheticProblem {
    pub name: String,
    pub f: Synthetic,
}

impl Problem for SyntheticProblem {
    fn name(&self) -> &str {
        &self.name
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.f.param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        Some(self.f.init_rules())
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        vec![]
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], _batch: &[NodeId]) -> NodeId {
        self.f.loss(g, params)
    }
    fn accuracy(&self, g: &mut Graph, params: &[NodeId], _batch: &[NodeId]) -> Option<NodeId> {
        let logits = self.f.logits(g, params)?;
        let labels = g.constant(self.f.labels()?.clone());
        Some(accuracy(g, logits, labels))
    }
    fn known_minimum(&self) -> Option<(Vec<Tensor>, f64)> {
        self.f.known_minimum()
    }
}

// ---- ONNX models --------------------------------------------------------------

/// An imported ONNX model with a scalar loss output as a problem: the
/// parameters are its float initializers (initial values from the file, the
/// same for every seed), the batch inputs are its data inputs, and the loss
/// is the model graph, inlined.
#[derive(Debug)]
pub struct OnnxProblem {
    name: String,
    model: ImportedModel,
    loss: String,
    data: Option<DataKind>,
}

impl OnnxProblem {
    /// Wrap `model`; `loss` must name a scalar f32 output.
    pub fn new(name: &str, model: ImportedModel, loss: &str) -> Result<Self, String> {
        let g = &model.graph;
        let id = g.find_output(loss).ok_or_else(|| {
            let outs: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "'{loss}' is not an output of the model (outputs: {})",
                outs.join(", ")
            )
        })?;
        let ty = g.ty(id);
        if !ty.shape.is_empty() || ty.dtype != DType::F32 {
            return Err(format!(
                "loss output '{loss}' must be a scalar f32, but has type {ty}"
            ));
        }
        if model.initializers.is_empty() {
            return Err("the model has no float initializers, so nothing to optimise".into());
        }
        Ok(OnnxProblem {
            name: name.into(),
            model,
            loss: loss.into(),
            data: None,
        })
    }

    /// Import `path` and wrap it; the problem is named after the file stem.
    pub fn from_file(path: &Path, loss: &str) -> Result<Self, String> {
        let model = metac_graphs::onnx::import_file(path).map_err(|e| e.to_string())?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "onnx".into());
        Self::new(&name, model, loss)
    }

    /// Declare which data set feeds the batch inputs (none by default: the
    /// caller supplies them).
    pub fn with_data(mut self, data: Option<DataKind>) -> Self {
        self.data = data;
        self
    }

    pub fn model(&self) -> &ImportedModel {
        &self.model
    }

    pub fn loss_output(&self) -> &str {
        &self.loss
    }
}

impl Problem for OnnxProblem {
    fn name(&self) -> &str {
        &self.name
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.model
            .initializers
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect()
    }
    /// None: the initial values are the file's (see `init_params`).
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        None
    }
    /// The initializer values stored in the file; `seed` is ignored.
    fn init_params(&self, _seed: u64) -> Vec<Tensor> {
        self.model
            .initializers
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        let g = &self.model.graph;
        self.model
            .data_inputs
            .iter()
            .map(|n| {
                let id = g.find_input(n).expect("data input is a graph input");
                (n.clone(), g.dtype(id), g.shape(id).to_vec())
            })
            .collect()
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        let mut bind = HashMap::new();
        for ((n, _), &id) in self.model.initializers.iter().zip(params) {
            bind.insert(n.clone(), id);
        }
        for (n, &id) in self.model.data_inputs.iter().zip(batch) {
            bind.insert(n.clone(), id);
        }
        let outs = inline_graph(g, &self.model.graph, &bind);
        outs[&self.loss]
    }
    fn needs_data(&self) -> Option<DataKind> {
        self.data
    }
}

/// Copy the nodes of `src` that its outputs depend on into `dst`, with each
/// `Input` node replaced by the node bound to its name; returns the ids in
/// `dst` of `src`'s outputs by name.
///
/// # Panics
/// When a needed input is unbound or bound to a node of another type (see
/// [`try_inline_graph`] for the fallible form).
pub fn inline_graph(
    dst: &mut Graph,
    src: &Graph,
    bindings: &HashMap<String, NodeId>,
) -> HashMap<String, NodeId> {
    try_inline_graph(dst, src, bindings).unwrap_or_else(|e| panic!("inline_graph: {e}"))
}

/// [`inline_graph`], reporting unbound or mistyped inputs as errors.
pub fn try_inline_graph(
    dst: &mut Graph,
    src: &Graph,
    bindings: &HashMap<String, NodeId>,
) -> Result<HashMap<String, NodeId>, String> {
    let roots: Vec<NodeId> = src.outputs().iter().map(|(_, id)| *id).collect();
    let live = live_nodes(src, &roots);
    let mut map: Vec<Option<NodeId>> = vec![None; src.len()];
    for (i, node) in src.nodes().iter().enumerate() {
        if !live[i] {
            continue;
        }
        let id = match &node.op {
            Op::Input { name } => {
                let &b = bindings
                    .get(name)
                    .ok_or_else(|| format!("input '{name}' ({}) is not bound", node.ty))?;
                if *dst.ty(b) != node.ty {
                    return Err(format!(
                        "input '{name}' has type {}, but is bound to a node of type {}",
                        node.ty,
                        dst.ty(b)
                    ));
                }
                b
            }
            op => {
                let ins: Vec<NodeId> = node
                    .inputs
                    .iter()
                    .map(|j| map[j.index()].expect("inputs precede their users"))
                    .collect();
                let id = dst.try_node(op.clone(), &ins).map_err(|e| e.to_string())?;
                debug_assert_eq!(*dst.ty(id), node.ty);
                id
            }
        };
        map[i] = Some(id);
    }
    Ok(src
        .outputs()
        .iter()
        .map(|(n, id)| (n.clone(), map[id.index()].expect("outputs are live")))
        .collect())
}

// ---- registry -----------------------------------------------------------------

const NAMES: &[&str] = &[
    "mnist-mlp",
    "mnist-mlp-relu",
    "mnist-mlp-deep",
    "mnist-convnet",
    "quadratic",
    "rosenbrock",
    "beale",
    "booth",
    "matyas",
    "styblinski-tang",
    "softmax-regression-random",
    "logsumexp",
];

/// The names [`problem_by_name`] knows.
pub fn problem_names() -> &'static [&'static str] {
    NAMES
}

/// The problem called `name`; `batch` is the minibatch size of the MNIST
/// problems (ignored by the synthetic ones).
pub fn problem_by_name(name: &str, batch: usize) -> Result<Box<dyn Problem>, String> {
    let mlp = |sizes: &[usize], act| -> Result<Box<dyn Problem>, String> {
        if batch == 0 {
            return Err(format!("problem '{name}' needs a batch size of at least 1"));
        }
        Ok(Box::new(MlpProblem {
            name: name.into(),
            mlp: Mlp::new(sizes, act),
            batch,
        }))
    };
    let syn = |f: Synthetic| -> Result<Box<dyn Problem>, String> {
        Ok(Box::new(SyntheticProblem {
            name: name.into(),
            f,
        }))
    };
    match name {
        "mnist-mlp" => mlp(&[784, 20, 10], Activation::Sigmoid),
        "mnist-mlp-relu" => mlp(&[784, 20, 10], Activation::Relu),
        "mnist-mlp-deep" => mlp(&[784, 20, 20, 10], Activation::Sigmoid),
        "mnist-convnet" => {
            if batch == 0 {
                return Err(format!("problem '{name}' needs a batch size of at least 1"));
            }
            Ok(Box::new(ConvNetProblem {
                name: name.into(),
                net: ConvNet::mnist_small(),
                batch,
            }))
        }
        "quadratic" => syn(Synthetic::quadratic(20, synthetic::DATA_SEED)),
        "rosenbrock" => syn(Synthetic::Rosenbrock { dim: 2 }),
        "beale" => syn(Synthetic::Beale),
        "booth" => syn(Synthetic::Booth),
        "matyas" => syn(Synthetic::Matyas),
        "styblinski-tang" => syn(Synthetic::StyblinskiTang { dim: 10 }),
        "softmax-regression-random" => syn(Synthetic::softmax_regression(
            128,
            20,
            10,
            0.2,
            synthetic::DATA_SEED + 1,
        )),
        "logsumexp" => syn(Synthetic::logsumexp(10, synthetic::DATA_SEED + 2)),
        _ => Err(format!(
            "unknown problem '{name}' (known problems: {})",
            NAMES.join(", ")
        )),
    }
}
