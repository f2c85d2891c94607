//! A small GPT-style language model on the builder, the one transformer the
//! language-model workloads share (the LM that MALMEN edits, the MoE LM of
//! Tiny-ONN): token and position embeddings, `layers` pre-LN blocks of
//! causal multi-head self-attention and a GELU MLP, a final layer norm and a
//! head (its own matrix, or the token embedding transposed when tied).
//!
//! Parameters are graph inputs (see [`Gpt::param_shapes`] for the names and
//! [`Gpt::init_rules`] for how they start), so the same graphs serve any
//! weights, and their gradients, HVPs and the adjoints of any layer's input
//! and output come from autodiff like every model's.
//!
//! Shapes: `tokens` and `targets` are i64 `[B, T]` with `T <= context`;
//! logits are `[B, T, vocab]`. Linear layers are `x[.., in] @ W[in, out] +
//! b[out]`, computed on `[B * T, in]`.

use metac_contract::init::{InitRule, TensorInit};
use metac_graphs::{DType, Graph, NodeId, Tensor};

use super::moe::{self, MoeLayer, MoeParams};

pub use metac_contract::lm::GptConfig;

/// Layer-norm epsilon (PyTorch's default).
pub const LN_EPS: f32 = 1e-5;
/// Standard deviation of the initial weights (GPT-2).
pub const INIT_STD: f64 = 0.02;

/// The language model; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt {
    pub config: GptConfig,
}

/// A linear layer's weight and bias.
struct Linear {
    w: NodeId,
    b: NodeId,
}

/// A linear layer's input and output in a graph, as
/// [`Gpt::trunk_taps`] finds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tap {
    pub layer: String,
    /// `[B * T, in]`.
    pub input: NodeId,
    /// `[B * T, out]` (bias included).
    pub output: NodeId,
}

/// Applies linear layers, noting the inputs and outputs of those wanted.
#[derive(Default)]
struct Tapper {
    want: Vec<String>,
    got: Vec<Tap>,
    /// The mixtures of the blocks, in order (models with `moe`).
    moe: Vec<MoeLayer>,
    /// Build the mixtures with `detach_experts` ([`moe::block`]).
    detach_experts: bool,
}

impl Tapper {
    fn linear(&mut self, g: &mut Graph, x: NodeId, name: &str, l: &Linear) -> NodeId {
        let y = linear(g, x, l);
        if self.want.iter().any(|w| w == name) {
            self.got.push(Tap {
                layer: name.to_string(),
                input: x,
                output: y,
            });
        }
        y
    }
}

/// A layer norm's gain and bias.
struct Norm {
    g: NodeId,
    b: NodeId,
}

impl Gpt {
    pub fn new(config: GptConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Gpt { config })
    }

    /// Names and shapes of the parameters ([`GptConfig::param_shapes`]).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.config.param_shapes()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// How the parameters start (GPT-2's scheme): weights and embeddings
    /// `N(0, 0.02²)`, the projections into the residual stream
    /// (`attn.proj.w`, `mlp.proj.w`, and the SwiGLU and expert `w2`)
    /// `N(0, (0.02 / sqrt(2 layers))²)`, biases
    /// 0, layer-norm gains 1; parameter `i` draws from stream `i`.
    pub fn init_rules(&self) -> Vec<TensorInit> {
        let residual = INIT_STD / (2.0 * self.config.layers as f64).sqrt();
        self.param_shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let rule = if name.ends_with(".g") {
                    InitRule::Constant { value: 1.0 }
                } else if name.ends_with(".b") {
                    InitRule::Constant { value: 0.0 }
                } else {
                    let std = if name.ends_with("proj.w") || name.ends_with(".w2") {
                        residual
                    } else {
                        INIT_STD
                    };
                    InitRule::Normal {
                        std,
                        stream: i as u64,
                    }
                };
                TensorInit::new(&name, &shape, rule)
            })
            .collect()
    }

    /// Initial parameter values for `seed`, in [`Gpt::param_shapes`] order.
    pub fn init_params(&self, seed: u64) -> Vec<Tensor> {
        self.init_rules().iter().map(|r| r.draw(seed)).collect()
    }

    /// Declare the parameters as f32 graph inputs under their names.
    pub fn params(&self, g: &mut Graph) -> Vec<NodeId> {
        self.param_shapes()
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect()
    }

    /// Logits `[B, T, vocab]` of i64 `tokens [B, T]`, each position seeing
    /// itself and the positions before it.
    ///
    /// # Panics
    /// If `params` is not [`Gpt::param_shapes`]-shaped or `T > context`.
    pub fn logits(&self, g: &mut Graph, params: &[NodeId], tokens: NodeId) -> NodeId {
        let (b, t) = self.tokens_shape(g, tokens);
        let x = self.trunk(g, params, tokens);
        let logits = self.readout(g, params, x);
        g.reshape(logits, &[b, t, self.config.vocab])
    }

    /// Logits `[B, vocab]` at one position per sequence: after token
    /// `positions[b]` (i64 `[B]`) of `tokens[b]`. The head runs on those `B`
    /// rows only, which is what a loss on one answer token per prompt needs.
    pub fn logits_at(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        positions: NodeId,
    ) -> NodeId {
        let x = self.trunk(g, params, tokens);
        let x = self.rows_at(g, x, tokens, positions);
        self.readout(g, params, x)
    }

    /// The mean cross-entropy of the answers (i64 `[B]`) predicted after
    /// `positions` ([`Gpt::logits_at`]).
    pub fn answer_loss(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        positions: NodeId,
        answers: NodeId,
    ) -> NodeId {
        let logits = self.logits_at(g, params, tokens, positions);
        let nll = answer_nll(g, logits, answers);
        let b = g.shape(answers)[0];
        let total = g.sum_all(nll);
        g.mul_scalar(total, 1.0 / b as f32)
    }

    /// Per prompt: the answer's negative log-likelihood and whether it is
    /// ranked first (1.0 or 0.0; a tie for the top counts), both f32 `[B]`.
    pub fn answer_scores(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        positions: NodeId,
        answers: NodeId,
    ) -> (NodeId, NodeId) {
        let logits = self.logits_at(g, params, tokens, positions);
        let nll = answer_nll(g, logits, answers);
        let logits = g.stop_gradient(logits);
        let top = g.reduce_max(logits, &[1], true);
        let is_top = g.equal(logits, top);
        let is_top = g.cast(is_top, DType::F32);
        let onehot = g.one_hot(answers, self.config.vocab);
        let hit = g.mul(is_top, onehot);
        let correct = g.sum(hit, &[1], false);
        (nll, correct)
    }

    /// Rows `b * T + positions[b]` of `x [B * T, k]` (a value along the
    /// sequences of `tokens [B, T]`): `[B, k]`.
    pub fn rows_at(&self, g: &mut Graph, x: NodeId, tokens: NodeId, positions: NodeId) -> NodeId {
        let (b, t) = self.tokens_shape(g, tokens);
        assert_eq!(g.shape(positions), [b], "Gpt: positions must be [B]");
        let starts = g.constant(Tensor::i64(&[b], (0..b).map(|i| (i * t) as i64).collect()));
        let rows = g.add(starts, positions);
        g.gather(x, rows, 0)
    }

    /// Logits `[B, vocab]` of the rows `[B, d]` of the final stream (before
    /// the final norm) of [`Gpt::trunk_taps`].
    pub fn head_of(&self, g: &mut Graph, params: &[NodeId], rows: NodeId) -> NodeId {
        self.readout(g, params, rows)
    }

    fn tokens_shape(&self, g: &Graph, tokens: NodeId) -> (usize, usize) {
        let ts = g.shape(tokens);
        assert_eq!(ts.len(), 2, "Gpt: tokens must be [B, T]");
        assert!(
            ts[1] <= self.config.context,
            "Gpt: {} tokens exceed the context {}",
            ts[1],
            self.config.context
        );
        (ts[0], ts[1])
    }

    /// The parameter called `name`.
    fn param(&self, params: &[NodeId], name: &str) -> NodeId {
        let names = self.param_shapes();
        assert_eq!(params.len(), names.len(), "Gpt: parameter count");
        let i = names
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("Gpt: no parameter '{name}'"));
        params[i]
    }

    /// The residual stream `[B * T, d]` after the last block.
    fn trunk(&self, g: &mut Graph, params: &[NodeId], tokens: NodeId) -> NodeId {
        self.trunk_tapped(g, params, tokens, &mut Tapper::default())
    }

    /// The linear layers (by name prefix: `l{i}.attn.qkv`, `l{i}.attn.proj`,
    /// and for the GELU MLP `l{i}.mlp.fc`, `l{i}.mlp.proj`) with their input
    /// and output widths.
    pub fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        let (d, h) = (self.config.width, self.config.width * self.config.mlp_ratio);
        let gelu = self.config.moe.is_none() && self.config.swiglu.is_none();
        (0..self.config.layers)
            .flat_map(|l| {
                let mut v = vec![
                    (format!("l{l}.attn.qkv"), d, 3 * d),
                    (format!("l{l}.attn.proj"), d, d),
                ];
                if gelu {
                    v.push((format!("l{l}.mlp.fc"), d, h));
                    v.push((format!("l{l}.mlp.proj"), h, d));
                }
                v
            })
            .collect()
    }

    /// The residual stream after the last block and the blocks' mixtures
    /// (empty unless the model has `moe`).
    pub fn trunk_moe(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
    ) -> (NodeId, Vec<MoeLayer>) {
        self.trunk_moe_with(g, params, tokens, false)
    }

    /// [`Gpt::trunk_moe`], the mixtures built with `detach_experts`
    /// ([`moe::block`]).
    fn trunk_moe_with(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        detach_experts: bool,
    ) -> (NodeId, Vec<MoeLayer>) {
        let mut tapper = Tapper {
            detach_experts,
            ..Tapper::default()
        };
        let x = self.trunk_tapped(g, params, tokens, &mut tapper);
        (x, tapper.moe)
    }

    /// The residual stream after the last block, with the inputs and
    /// outputs (`[B * T, in]`, `[B * T, out]`) of the linear layers named in
    /// `layers`, in that order.
    ///
    /// # Panics
    /// If a name is not one of [`Gpt::linear_layers`].
    pub fn trunk_taps(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        layers: &[String],
    ) -> (NodeId, Vec<Tap>) {
        let known = self.linear_layers();
        for l in layers {
            assert!(
                known.iter().any(|(n, _, _)| n == l),
                "Gpt: no linear layer '{l}'"
            );
        }
        let mut tapper = Tapper {
            want: layers.to_vec(),
            ..Tapper::default()
        };
        let x = self.trunk_tapped(g, params, tokens, &mut tapper);
        let taps = layers
            .iter()
            .map(|l| {
                tapper
                    .got
                    .iter()
                    .find(|t| &t.layer == l)
                    .cloned()
                    .expect("every known layer is tapped")
            })
            .collect();
        (x, taps)
    }

    fn trunk_tapped(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        tapper: &mut Tapper,
    ) -> NodeId {
        let c = &self.config;
        let (b, t) = self.tokens_shape(g, tokens);
        let p = |name: &str| self.param(params, name);
        let d = c.width;
        let tok = g.gather(p("tok_emb"), tokens, 0); // [B, T, d]
        let pos = g.slice(p("pos_emb"), 0, 0, t); // [T, d]
        let x = g.add(tok, pos);
        let mut x = g.reshape(x, &[b * t, d]);
        // Position i attends to positions j <= i.
        let causal = Tensor::bool(&[t, t], (0..t * t).map(|k| k % t <= k / t).collect());
        let causal = g.constant(causal);
        // A linear layer's or a layer norm's parameters, by name prefix.
        let lin = |pre: &str| Linear {
            w: p(&format!("{pre}.w")),
            b: p(&format!("{pre}.b")),
        };
        let norm = |pre: &str| Norm {
            g: p(&format!("{pre}.g")),
            b: p(&format!("{pre}.b")),
        };
        for l in 0..c.layers {
            let h = layer_norm(g, x, &norm(&format!("l{l}.ln1")));
            let (qkv, proj) = (format!("l{l}.attn.qkv"), format!("l{l}.attn.proj"));
            let z = tapper.linear(g, h, &qkv, &lin(&qkv));
            let y = self.attention(g, z, causal, b, t);
            let a = tapper.linear(g, y, &proj, &lin(&proj));
            x = g.add(x, a);
            let h = layer_norm(g, x, &norm(&format!("l{l}.ln2")));
            let m = match (&c.moe, c.swiglu) {
                (Some(cfg), _) => {
                    let q = |n: &str| p(&format!("l{l}.moe.{n}"));
                    let mp = MoeParams {
                        wr: q("router.w"),
                        br: q("router.b"),
                        w1: q("w1"),
                        w3: q("w3"),
                        w2: q("w2"),
                    };
                    let layer = moe::block(g, h, &mp, cfg, tapper.detach_experts);
                    let y = layer.output;
                    tapper.moe.push(layer);
                    y
                }
                (None, Some(_)) => {
                    let q = |n: &str| p(&format!("l{l}.mlp.{n}"));
                    moe::swiglu(g, h, q("w1"), q("w3"), q("w2"))
                }
                (None, None) => {
                    let fc = format!("l{l}.mlp.fc");
                    let h = tapper.linear(g, h, &fc, &lin(&fc));
                    let h = gelu(g, h);
                    let pj = format!("l{l}.mlp.proj");
                    tapper.linear(g, h, &pj, &lin(&pj))
                }
            };
            x = g.add(x, m);
        }
        x
    }

    /// Final layer norm and head: rows `[N, d]` of the stream to logits
    /// `[N, vocab]`.
    fn readout(&self, g: &mut Graph, params: &[NodeId], x: NodeId) -> NodeId {
        let p = |name: &str| self.param(params, name);
        let x = layer_norm(
            g,
            x,
            &Norm {
                g: p("ln_f.g"),
                b: p("ln_f.b"),
            },
        );
        let head = if self.config.tied_head {
            g.transpose(p("tok_emb"), &[1, 0])
        } else {
            p("head.w")
        };
        g.matmul(x, head)
    }

    /// Causal multi-head self-attention of the queries, keys and values
    /// `z [B * T, 3d]`, before the output projection: `[B * T, d]`.
    fn attention(&self, g: &mut Graph, z: NodeId, causal: NodeId, b: usize, t: usize) -> NodeId {
        let (d, nh) = (self.config.width, self.config.heads);
        let dh = d / nh;
        let split = |g: &mut Graph, k: usize| {
            let s = g.slice(z, 1, k * d, (k + 1) * d);
            let s = g.reshape(s, &[b, t, nh, dh]);
            g.transpose(s, &[0, 2, 1, 3]) // [B, H, T, dh]
        };
        let (q, k, v) = (split(g, 0), split(g, 1), split(g, 2));
        let kt = g.transpose_last2(k);
        let scores = g.matmul(q, kt); // [B, H, T, T]
        let scores = g.mul_scalar(scores, 1.0 / (dh as f32).sqrt());
        let masked = g.fill(-1e9, DType::F32, &[]);
        let scores = g.where_(causal, scores, masked);
        let att = g.softmax(scores, 3);
        let y = g.matmul(att, v); // [B, H, T, dh]
        let y = g.transpose(y, &[0, 2, 1, 3]);
        g.reshape(y, &[b * t, d])
    }

    /// The weighted mean next-token cross-entropy: `sum(w * nll) /
    /// max(sum(w), 1)` over i64 `targets [B, T]` with f32 weights `w [B, T]`
    /// (1 on the tokens that count, 0 elsewhere, e.g. an answer's tokens).
    pub fn loss(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        targets: NodeId,
        weights: NodeId,
    ) -> NodeId {
        self.loss_moe(g, params, tokens, targets, weights).0
    }

    /// [`Gpt::loss`] and the blocks' mixtures (empty unless the model has
    /// `moe`).
    pub fn loss_moe(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        targets: NodeId,
        weights: NodeId,
    ) -> (NodeId, Vec<MoeLayer>) {
        self.loss_moe_with(g, params, tokens, targets, weights, false)
    }

    /// [`Gpt::loss_moe`], the mixtures built with `detach_experts`
    /// ([`moe::block`]): its reverse pass needs the experts' input
    /// derivative added by hand ([`moe::surprise_and_input_grad`]).
    pub fn loss_moe_with(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        tokens: NodeId,
        targets: NodeId,
        weights: NodeId,
        detach_experts: bool,
    ) -> (NodeId, Vec<MoeLayer>) {
        let (b, t) = self.tokens_shape(g, tokens);
        let (x, layers) = self.trunk_moe_with(g, params, tokens, detach_experts);
        let logits = self.readout(g, params, x);
        let logits = g.reshape(logits, &[b, t, self.config.vocab]);
        let logp = g.log_softmax(logits, 2);
        let onehot = g.one_hot(targets, self.config.vocab);
        let picked = g.mul(logp, onehot);
        let ll = g.sum(picked, &[2], false); // [B, T]
        let weighted = g.mul(ll, weights);
        let total = g.sum_all(weighted);
        let count = g.sum_all(weights);
        let one = g.scalar(1.0);
        let count = g.max(count, one);
        let mean = g.div(total, count);
        (g.neg(mean), layers)
    }
}

/// `-log softmax(logits)[answer]` per row of `logits [B, V]`.
pub fn answer_nll(g: &mut Graph, logits: NodeId, answers: NodeId) -> NodeId {
    let v = g.shape(logits)[1];
    let logp = g.log_softmax(logits, 1);
    let onehot = g.one_hot(answers, v);
    let picked = g.mul(logp, onehot);
    let ll = g.sum(picked, &[1], false);
    g.neg(ll)
}

/// `x[.., in] @ W + b`.
fn linear(g: &mut Graph, x: NodeId, l: &Linear) -> NodeId {
    let y = g.matmul(x, l.w);
    g.add(y, l.b)
}

/// Layer norm over the last axis: `(x - mean) / sqrt(var + eps) * g + b`.
fn layer_norm(g: &mut Graph, x: NodeId, n: &Norm) -> NodeId {
    let last = g.shape(x).len() - 1;
    let mu = g.mean(x, &[last], true);
    let xc = g.sub(x, mu);
    let sq = g.square(xc);
    let var = g.mean(sq, &[last], true);
    let var = g.add_scalar(var, LN_EPS);
    let sd = g.sqrt(var);
    let y = g.div(xc, sd);
    let y = g.mul(y, n.g);
    g.add(y, n.b)
}

/// The exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
fn gelu(g: &mut Graph, x: NodeId) -> NodeId {
    let s = g.mul_scalar(x, std::f32::consts::FRAC_1_SQRT_2);
    let e = g.erf(s);
    let e1 = g.add_scalar(e, 1.0);
    let y = g.mul(x, e1);
    g.mul_scalar(y, 0.5)
}
