//! The MALMEN editor's graphs: a hypernetwork that turns the decomposed
//! gradient of a language model's edited layers into the values of a
//! least-squares parameter shift (`docs/editing.md` has the algorithm).
//!
//! For every edited linear layer `v = u W + b` (`W [in, out]`) and every
//! edit (one answer token each):
//!
//! * `cache`: the layer's input `u` ("key", `[in]`) and the adjoint of the
//!   edit's answer NLL with respect to the layer's output, `delta = dL/dv`
//!   (`[out]`), at the answer position. `sum_j delta_j u_j^T` is the
//!   layer's weight gradient, so the pairs are a rank-decomposed gradient.
//! * `values`: the hypernetwork. Input `[u, delta]` normalised by running
//!   statistics of its group, `blocks` residual blocks `x = y + scale[l] *
//!   relu(y A B + bias) + shift[l]` (`A [D, rank]`, `B [rank, D]`, B = 0 at
//!   the start, so the network starts as the identity), the output split
//!   into a pseudo-key `u~` and a pseudo value-gradient `delta~`; the value
//!   `d_j = -lr[l] * (u_j . u~_j) * delta~_j`. Layers of one shape share a
//!   network (a group); `scale` and `shift` have a row per layer of the
//!   group, `lr` and `lamda` an entry per edited layer.
//! * `values_vjp`: the gradient of `sum_l <dd_l, d_l>` with respect to the
//!   hypernetwork for given cotangents `dd_l`: the last step of the
//!   decoupled meta-gradient.
//! * `meta_loss`: the edited model's loss on prompts it should now answer
//!   (cross-entropy, per-prompt weights) and on prompts it should answer as
//!   before (KL from reference log-probabilities), with its gradient with
//!   respect to the edited layers' weights.
//! * `logp`: log-probabilities at answer positions (the locality reference).
//!
//! The least-squares shift `S = (U^T U + exp(lamda) I)^{-1} U^T D` and its
//! adjoint run on the host (`metac_runtime::editor::solve`): ONNX has no
//! linear solve.

use metac_contract::init::{InitRule, TensorInit};
use metac_graphs::autodiff::grad;
use metac_graphs::{DType, Graph, NodeId};

use super::transformer::{answer_nll, Gpt};

/// What the editor edits and how big its hypernetwork is.
#[derive(Clone, Debug, PartialEq)]
pub struct EditorSpec {
    /// Edited linear layers of the LM (`l3.mlp.proj`, ...).
    pub layers: Vec<String>,
    /// Rank of each block's `A B`.
    pub rank: usize,
    pub blocks: usize,
    /// Initial per-layer learning rate of the values.
    pub lr_init: f32,
    /// `hyper.lr` holds the logarithm of the learning rate (so that an
    /// optimizer's step changes it relatively).
    pub log_lr: bool,
}

/// An edited layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditedLayer {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    /// Its group (layers of one shape) and its row in the group's
    /// per-layer parameters.
    pub group: usize,
    pub row: usize,
}

/// The editor of a [`Gpt`]; see the module docs.
#[derive(Clone, Debug)]
pub struct Editor {
    pub gpt: Gpt,
    pub spec: EditorSpec,
    pub layers: Vec<EditedLayer>,
    /// Per group: `(d_in, d_out)` and its layers (indices into `layers`).
    pub groups: Vec<((usize, usize), Vec<usize>)>,
}

impl Editor {
    /// The editor of `spec.layers` of `gpt`; an unknown or repeated layer
    /// is an error naming it.
    pub fn new(gpt: Gpt, spec: EditorSpec) -> Result<Self, String> {
        if spec.layers.is_empty() {
            return Err("the editor edits no layer (editor.layers is empty)".into());
        }
        if spec.rank == 0 || spec.blocks == 0 {
            return Err("editor.rank and editor.blocks must be at least 1".into());
        }
        let known = gpt.linear_layers();
        let mut layers: Vec<EditedLayer> = vec![];
        let mut groups: Vec<((usize, usize), Vec<usize>)> = vec![];
        for name in &spec.layers {
            let Some((_, d_in, d_out)) = known.iter().find(|(n, _, _)| n == name) else {
                return Err(format!(
                    "the model has no linear layer '{name}' to edit (it has {})",
                    known
                        .iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            if layers.iter().any(|l| &l.name == name) {
                return Err(format!("layer '{name}' is listed twice in editor.layers"));
            }
            let shape = (*d_in, *d_out);
            let group = match groups.iter().position(|(s, _)| *s == shape) {
                Some(k) => k,
                None => {
                    groups.push((shape, vec![]));
                    groups.len() - 1
                }
            };
            let row = groups[group].1.len();
            groups[group].1.push(layers.len());
            layers.push(EditedLayer {
                name: name.clone(),
                d_in: *d_in,
                d_out: *d_out,
                group,
                row,
            });
        }
        Ok(Editor {
            gpt,
            spec,
            layers,
            groups,
        })
    }

    /// Names and shapes of the hypernetwork's parameters: per group `k` and
    /// block `b`, `hyper.g{k}.b{b}.{a [D, rank], b [rank, D], bias [D],
    /// scale [L_k, D], shift [L_k, D]}` (`D = in + out`, `L_k` the group's
    /// layers); then `hyper.lr [L]` and `hyper.lamda [L]` over the edited
    /// layers.
    pub fn hyper_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        for (k, ((i, o), members)) in self.groups.iter().enumerate() {
            let d = i + o;
            for b in 0..self.spec.blocks {
                let p = format!("hyper.g{k}.b{b}");
                v.push((format!("{p}.a"), vec![d, self.spec.rank]));
                v.push((format!("{p}.b"), vec![self.spec.rank, d]));
                v.push((format!("{p}.bias"), vec![d]));
                v.push((format!("{p}.scale"), vec![members.len(), d]));
                v.push((format!("{p}.shift"), vec![members.len(), d]));
            }
        }
        v.push(("hyper.lr".into(), vec![self.layers.len()]));
        v.push(("hyper.lamda".into(), vec![self.layers.len()]));
        v
    }

    /// How the hypernetwork starts (as MALMEN's): `A ~ N(0, 1)`, `B = 0`,
    /// bias and shift 0, scale 1 (the identity), `lr = lr_init` (or its
    /// logarithm, with `log_lr`), `lamda =
    /// 0` (lambda = 1); parameter `i` draws from stream `i`.
    pub fn hyper_init_rules(&self) -> Vec<TensorInit> {
        self.hyper_shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let rule = if name.ends_with(".a") {
                    InitRule::Normal {
                        std: 1.0,
                        stream: i as u64,
                    }
                } else if name.ends_with(".scale") {
                    InitRule::Constant { value: 1.0 }
                } else if name == "hyper.lr" {
                    InitRule::Constant {
                        value: if self.spec.log_lr {
                            self.spec.lr_init.ln()
                        } else {
                            self.spec.lr_init
                        },
                    }
                } else {
                    InitRule::Constant { value: 0.0 }
                };
                TensorInit::new(&name, &shape, rule)
            })
            .collect()
    }

    /// The normalisers' statistics, graph inputs of `values`:
    /// `norm.g{k}.mean [D]`, `norm.g{k}.std [D]`.
    pub fn norm_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.groups
            .iter()
            .enumerate()
            .flat_map(|(k, ((i, o), _))| {
                [
                    (format!("norm.g{k}.mean"), vec![i + o]),
                    (format!("norm.g{k}.std"), vec![i + o]),
                ]
            })
            .collect()
    }

    /// `cache` for `c` edits of `seq` tokens: inputs the LM's parameters,
    /// `tokens [c, T]`, `positions [c]`, `answers [c]`, `weights [c]` (0 on
    /// padding rows); outputs `u.{layer} [c, in]` and `delta.{layer} [c,
    /// out]` per edited layer, `delta` being the adjoint of `sum_j w_j
    /// nll_j`.
    pub fn build_cache(&self, c: usize, seq: usize) -> Graph {
        let mut g = Graph::new();
        let params = self.gpt.params(&mut g);
        let (tokens, positions, answers) = prompt_inputs(&mut g, "", c, seq);
        let weights = g.input("weights", DType::F32, &[c]);
        let names = self.layer_names();
        let (x, taps) = self.gpt.trunk_taps(&mut g, &params, tokens, &names);
        let rows = self.gpt.rows_at(&mut g, x, tokens, positions);
        let logits = self.gpt.head_of(&mut g, &params, rows);
        let nll = answer_nll(&mut g, logits, answers);
        let weighted = g.mul(nll, weights);
        let loss = g.sum_all(weighted);
        let outs: Vec<NodeId> = taps.iter().map(|t| t.output).collect();
        let deltas = grad(&mut g, loss, &outs);
        for (t, &dv) in taps.iter().zip(&deltas) {
            let u = self.gpt.rows_at(&mut g, t.input, tokens, positions);
            let delta = self.gpt.rows_at(&mut g, dv, tokens, positions);
            g.output(&format!("u.{}", t.layer), u);
            g.output(&format!("delta.{}", t.layer), delta);
        }
        g
    }

    fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }

    /// The values `d.{layer} [c, out]` of `c` cached pairs per layer; the
    /// graph's inputs are the hypernetwork's parameters (without `lamda`,
    /// which only the solve reads), the normalisers' statistics, and
    /// `u.{layer}`, `delta.{layer}`. Returns the graph, the parameter
    /// inputs and the values.
    fn values_graph(&self, c: usize) -> (Graph, Vec<NodeId>, Vec<NodeId>) {
        let mut g = Graph::new();
        let hyper = self.hyper_inputs(&mut g);
        let norms = self.norm_inputs(&mut g);
        let pairs: Vec<(NodeId, NodeId)> = self
            .layers
            .iter()
            .map(|l| {
                (
                    g.input(&format!("u.{}", l.name), DType::F32, &[c, l.d_in]),
                    g.input(&format!("delta.{}", l.name), DType::F32, &[c, l.d_out]),
                )
            })
            .collect();
        let values = self.values_of(&mut g, &hyper, &norms, &pairs);
        for (l, &d) in self.layers.iter().zip(&values) {
            g.output(&format!("d.{}", l.name), d);
        }
        let params = hyper.iter().map(|(_, id)| *id).collect();
        (g, params, values)
    }

    /// The hypernetwork's parameters but `lamda` as graph inputs, in
    /// [`Editor::hyper_shapes`] order.
    pub fn hyper_inputs(&self, g: &mut Graph) -> Vec<(String, NodeId)> {
        self.hyper_shapes()
            .into_iter()
            .filter(|(n, _)| n != "hyper.lamda")
            .map(|(n, s)| {
                let id = g.input(&n, DType::F32, &s);
                (n, id)
            })
            .collect()
    }

    /// The normalisers' `(mean, std)` per group as graph inputs.
    pub fn norm_inputs(&self, g: &mut Graph) -> Vec<(NodeId, NodeId)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(k, ((i, o), _))| {
                (
                    g.input(&format!("norm.g{k}.mean"), DType::F32, &[i + o]),
                    g.input(&format!("norm.g{k}.std"), DType::F32, &[i + o]),
                )
            })
            .collect()
    }

    /// The values of the `(u, delta)` pairs of every edited layer (see the
    /// module docs), given the hypernetwork's parameters by name and the
    /// normalisers' statistics per group.
    pub fn values_of(
        &self,
        g: &mut Graph,
        hyper: &[(String, NodeId)],
        norms: &[(NodeId, NodeId)],
        pairs: &[(NodeId, NodeId)],
    ) -> Vec<NodeId> {
        let p = |name: &str| -> NodeId {
            hyper
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, id)| *id)
                .unwrap_or_else(|| panic!("no hypernetwork parameter '{name}'"))
        };
        let mut values = vec![];
        for (li, (l, &(u, delta))) in self.layers.iter().zip(pairs).enumerate() {
            let (mean, std) = norms[l.group];
            let h = g.concat(&[u, delta], 1);
            let h = g.sub(h, mean);
            let mut h = g.div(h, std);
            for b in 0..self.spec.blocks {
                let pre = format!("hyper.g{}.b{b}", l.group);
                let z = g.matmul(h, p(&format!("{pre}.a")));
                let z = g.matmul(z, p(&format!("{pre}.b")));
                let z = g.add(z, p(&format!("{pre}.bias")));
                let z = clamp_min0(g, z);
                let scale = g.slice(p(&format!("{pre}.scale")), 0, l.row, l.row + 1);
                let shift = g.slice(p(&format!("{pre}.shift")), 0, l.row, l.row + 1);
                let z = g.mul(z, scale);
                let z = g.add(z, shift);
                h = g.add(h, z);
            }
            let pk = g.slice(h, 1, 0, l.d_in);
            let pv = g.slice(h, 1, l.d_in, l.d_in + l.d_out);
            let dot = g.mul(u, pk);
            let dot = g.sum(dot, &[1], true); // [c, 1]
            let lr = g.slice(p("hyper.lr"), 0, li, li + 1); // [1]
            let lr = if self.spec.log_lr { g.exp(lr) } else { lr };
            let coef = g.mul(dot, lr);
            let coef = g.neg(coef);
            values.push(g.mul(coef, pv));
        }
        values
    }

    /// `values` for chunks of `c` pairs per layer (see the module docs).
    pub fn build_values(&self, c: usize) -> Graph {
        self.values_graph(c).0
    }

    /// `values_vjp`: the inputs of `values` and cotangents `dd.{layer} [c,
    /// out]`; outputs `grad.{param}` for every hypernetwork parameter but
    /// `lamda`.
    pub fn build_values_vjp(&self, c: usize) -> Graph {
        let (mut g, params, values) = self.values_graph(c);
        let mut proxy = None;
        for (l, &d) in self.layers.iter().zip(&values) {
            let dd = g.input(&format!("dd.{}", l.name), DType::F32, &[c, l.d_out]);
            let prod = g.mul(dd, d);
            let s = g.sum_all(prod);
            proxy = Some(match proxy {
                None => s,
                Some(p) => g.add(p, s),
            });
        }
        let proxy = proxy.expect("at least one layer");
        let grads = grad(&mut g, proxy, &params);
        g.set_outputs(vec![]);
        let names: Vec<String> = self
            .hyper_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "hyper.lamda")
            .collect();
        for (n, gr) in names.iter().zip(grads) {
            g.output(&format!("grad.{n}"), gr);
        }
        g
    }

    /// `meta_loss`: the LM's parameters; `ce.{tokens, positions, answers,
    /// weights}` (`ce` prompts whose answers the edited model should give)
    /// and `kl.{tokens, positions, weights}` with `kl.ref_logp [kl, V]`
    /// (prompts it should answer as the reference did); outputs `loss =
    /// sum w nll + sum w KL(ref || edited)` and `grad.{layer}.w`, its
    /// gradient with respect to each edited layer's weight.
    pub fn build_meta_loss(&self, ce: usize, kl: usize, seq: usize) -> Graph {
        let mut g = Graph::new();
        let params = self.gpt.params(&mut g);
        let batch = MetaBatch::inputs(&mut g, ce, kl, seq, self.gpt.config.vocab);
        let loss = self.meta_loss_of(&mut g, &params, &batch);
        let wrt = self.edited_weights(&params);
        let grads = grad(&mut g, loss, &wrt);
        g.output("loss", loss);
        for (l, gr) in self.layers.iter().zip(grads) {
            g.output(&format!("grad.{}.w", l.name), gr);
        }
        g
    }

    /// The edited layers' weights among the LM's parameter nodes.
    pub fn edited_weights(&self, params: &[NodeId]) -> Vec<NodeId> {
        let names = self.gpt.param_shapes();
        self.layers
            .iter()
            .map(|l| {
                let w = format!("{}.w", l.name);
                params[names
                    .iter()
                    .position(|(n, _)| *n == w)
                    .expect("layer weight")]
            })
            .collect()
    }

    /// The meta-loss of the model with parameters `params` on `batch` (see
    /// [`Editor::build_meta_loss`]).
    pub fn meta_loss_of(&self, g: &mut Graph, params: &[NodeId], batch: &MetaBatch) -> NodeId {
        let logits = self
            .gpt
            .logits_at(g, params, batch.ce_tokens, batch.ce_positions);
        let nll = answer_nll(g, logits, batch.ce_answers);
        let ce_terms = g.mul(nll, batch.ce_weights);
        let ce_loss = g.sum_all(ce_terms);
        let logits = self
            .gpt
            .logits_at(g, params, batch.kl_tokens, batch.kl_positions);
        let logp = g.log_softmax(logits, 1);
        let pref = g.exp(batch.kl_ref_logp);
        let diff = g.sub(batch.kl_ref_logp, logp);
        let kl_rows = g.mul(pref, diff);
        let kl_rows = g.sum(kl_rows, &[1], false);
        let kl_terms = g.mul(kl_rows, batch.kl_weights);
        let kl_loss = g.sum_all(kl_terms);
        g.add(ce_loss, kl_loss)
    }

    /// `logp`: the LM's parameters, `tokens [c, T]`, `positions [c]`;
    /// output `logp [c, V]`, the log-probabilities after each prompt.
    pub fn build_logp(&self, c: usize, seq: usize) -> Graph {
        let mut g = Graph::new();
        let params = self.gpt.params(&mut g);
        let tokens = g.input("tokens", DType::I64, &[c, seq]);
        let positions = g.input("positions", DType::I64, &[c]);
        let logits = self.gpt.logits_at(&mut g, &params, tokens, positions);
        let logp = g.log_softmax(logits, 1);
        g.output("logp", logp);
        g
    }
}

/// `max(z, 0)` with the derivative 1 at 0, as PyTorch's `clamp(0)` in
/// MALMEN's blocks: the blocks start at `B = 0` and `bias = 0`, so every
/// pre-activation starts at exactly 0, where a ReLU's derivative (0) would
/// keep `B`, `bias` and `scale` from ever learning.
fn clamp_min0(g: &mut Graph, z: NodeId) -> NodeId {
    let zero = g.scalar(0.0);
    let neg = g.less(z, zero);
    let zeros = g.zeros_like(z);
    g.where_(neg, zeros, z)
}

/// The inputs of `meta_loss`.
#[derive(Clone, Copy, Debug)]
pub struct MetaBatch {
    pub ce_tokens: NodeId,
    pub ce_positions: NodeId,
    pub ce_answers: NodeId,
    pub ce_weights: NodeId,
    pub kl_tokens: NodeId,
    pub kl_positions: NodeId,
    pub kl_weights: NodeId,
    pub kl_ref_logp: NodeId,
}

impl MetaBatch {
    /// Declare them: `ce.{tokens, positions, answers, weights}` for `ce`
    /// prompts, `kl.{tokens, positions, weights, ref_logp}` for `kl`.
    pub fn inputs(g: &mut Graph, ce: usize, kl: usize, seq: usize, vocab: usize) -> Self {
        let (ce_tokens, ce_positions, ce_answers) = prompt_inputs(g, "ce.", ce, seq);
        MetaBatch {
            ce_tokens,
            ce_positions,
            ce_answers,
            ce_weights: g.input("ce.weights", DType::F32, &[ce]),
            kl_tokens: g.input("kl.tokens", DType::I64, &[kl, seq]),
            kl_positions: g.input("kl.positions", DType::I64, &[kl]),
            kl_weights: g.input("kl.weights", DType::F32, &[kl]),
            kl_ref_logp: g.input("kl.ref_logp", DType::F32, &[kl, vocab]),
        }
    }
}

/// Inputs `{prefix}tokens [c, T]`, `{prefix}positions [c]`,
/// `{prefix}answers [c]`.
fn prompt_inputs(g: &mut Graph, prefix: &str, c: usize, seq: usize) -> (NodeId, NodeId, NodeId) {
    (
        g.input(&format!("{prefix}tokens"), DType::I64, &[c, seq]),
        g.input(&format!("{prefix}positions"), DType::I64, &[c]),
        g.input(&format!("{prefix}answers"), DType::I64, &[c]),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::models::transformer::GptConfig;

    fn spec(layers: &[&str]) -> EditorSpec {
        EditorSpec {
            layers: layers.iter().map(|s| s.to_string()).collect(),
            rank: 4,
            blocks: 2,
            lr_init: 1e-3,
            log_lr: false,
        }
    }

    fn gpt() -> Gpt {
        Gpt::new(GptConfig::reference(100)).unwrap()
    }

    #[test]
    fn layers_of_one_shape_share_a_network() {
        let e = Editor::new(gpt(), spec(&["l3.mlp.proj", "l2.mlp.proj", "l3.mlp.fc"])).unwrap();
        assert_eq!(e.groups.len(), 2);
        assert_eq!(e.groups[0], ((512, 128), vec![0, 1]));
        assert_eq!((e.layers[1].group, e.layers[1].row), (0, 1));
        let shapes: HashMap<String, Vec<usize>> = e.hyper_shapes().into_iter().collect();
        assert_eq!(shapes["hyper.g0.b1.a"], [640, 4]);
        assert_eq!(shapes["hyper.g0.b0.scale"], [2, 640]);
        assert_eq!(shapes["hyper.g1.b0.shift"], [1, 640]);
        assert_eq!(shapes["hyper.lr"], [3]);
        let rules = e.hyper_init_rules();
        assert_eq!(rules.len(), shapes.len());
        let b = rules.iter().find(|r| r.name == "hyper.g0.b0.b").unwrap();
        assert_eq!(b.rule, InitRule::Constant { value: 0.0 });
    }

    #[test]
    fn an_unknown_or_repeated_layer_is_named() {
        let e = Editor::new(gpt(), spec(&["l9.mlp.proj"])).unwrap_err();
        assert!(
            e.contains("'l9.mlp.proj'") && e.contains("l3.mlp.proj"),
            "{e}"
        );
        let e = Editor::new(gpt(), spec(&["l1.mlp.proj", "l1.mlp.proj"])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(Editor::new(gpt(), spec(&[])).is_err());
    }

    /// The inputs of `g` (an editor graph) at the hypernetwork's initial
    /// values (seed 3), unit normalisers, and fixed keys and adjoints.
    fn init_env(e: &Editor, g: &Graph) -> HashMap<String, metac_graphs::eval::Value> {
        use metac_graphs::eval::Value;
        let init: HashMap<String, Value> = e
            .hyper_init_rules()
            .iter()
            .map(|r| (r.name.clone(), Value::from_tensor(&r.draw(3))))
            .collect();
        let mut env = HashMap::new();
        for (name, id) in g.inputs() {
            let shape = g.shape(id).to_vec();
            let n: usize = shape.iter().product();
            let v = match init.get(&name) {
                Some(v) => v.clone(),
                None if name.ends_with(".std") => {
                    Value::from_tensor(&metac_graphs::Tensor::f32(&shape, vec![1.0; n]))
                }
                None => Value::from_tensor(&metac_graphs::Tensor::f32(
                    &shape,
                    (0..n).map(|k| ((k % 7) as f32 - 3.0) * 0.1).collect(),
                )),
            };
            env.insert(name, v);
        }
        env
    }

    #[test]
    fn a_log_learning_rate_gives_the_same_initial_values() {
        use metac_graphs::eval::eval_graph;
        let values = |log_lr: bool| {
            let e = Editor::new(
                gpt(),
                EditorSpec {
                    log_lr,
                    ..spec(&["l3.mlp.proj"])
                },
            )
            .unwrap();
            let g = e.build_values(2);
            let out = eval_graph(&g, &init_env(&e, &g)).unwrap();
            out[0].1.f().iter().copied().collect::<Vec<f64>>()
        };
        let (lin, log) = (values(false), values(true));
        assert!(lin.iter().any(|&x| x != 0.0));
        for (a, b) in lin.iter().zip(&log) {
            assert!((a - b).abs() <= 1e-9 + 1e-5 * a.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn the_blocks_learn_from_their_zero_start() {
        // At B = 0 and bias = 0 every pre-activation is exactly 0: the
        // gradient must still reach B and bias (MALMEN's clamp), or the
        // blocks never leave the identity.
        use metac_graphs::eval::eval_graph;
        let e = Editor::new(gpt(), spec(&["l3.mlp.proj"])).unwrap();
        let mut g = e.build_values(2);
        let d = g.outputs()[0].1;
        let loss = g.sum_all(d);
        let wrt: Vec<NodeId> = ["hyper.g0.b0.b", "hyper.g0.b0.bias"]
            .iter()
            .map(|n| g.find_input(n).unwrap())
            .collect();
        let grads = grad(&mut g, loss, &wrt);
        g.set_outputs(vec![("db".into(), grads[0]), ("dbias".into(), grads[1])]);
        let env = init_env(&e, &g);
        for (name, v) in eval_graph(&g, &env).unwrap() {
            let norm: f64 = v.f().iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(norm > 0.0, "{name}: no gradient at the start");
        }
    }
}
