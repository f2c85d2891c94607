//! The language-model workload's contract: the model's shape
//! ([`GptConfig`]), the data it learns ([`LmData`]), the compile config
//! ([`LmConfig`], a TOML file), the run settings ([`LmRunSettings`], its
//! `[run]` table) and the typed metadata of an LM bundle ([`LmMeta`],
//! `meta.lm` of its manifest).
//!
//! An LM bundle holds two graphs:
//! * `train_step`: parameters, Adam's state and a batch in; the new
//!   parameters (`new.{name}`), the new state and the batch's `loss` (before
//!   the update) out;
//! * `evaluate`: parameters and an evaluation batch in; per prompt the
//!   answer's negative log-likelihood (`nll`, f32 `[E]`) and whether it is
//!   ranked first (`correct`, f32 `[E]`, ties count) out.
//!
//! Batches are prompts with one answer token each: `tokens` (i64 `[B, T]`,
//! padded after the prompt with token 0), `positions` (i64 `[B]`, the index
//! of the prompt's last token) and `answers` (i64 `[B]`).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::init::TensorInit;
use crate::io::TrainStepIo;
pub use crate::moe::MoeConfig;

/// Bundle kind of a language-model bundle.
pub const LM_KIND: &str = "lm";
/// The training-step graph.
pub const LM_TRAIN_STEP: &str = "train_step";
/// The evaluation graph.
pub const LM_EVALUATE: &str = "evaluate";

/// The shape of the GPT-style language model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Longest sequence (positions of the position embedding).
    pub context: usize,
    /// Model width `d`.
    pub width: usize,
    pub layers: usize,
    /// Attention heads; `width` must be a multiple.
    pub heads: usize,
    /// Hidden width of the MLP as a multiple of `width` (GPT-2: 4).
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    /// The head is the token embedding transposed (no `head.w`).
    #[serde(default)]
    pub tied_head: bool,
    /// Every block's MLP is a mixture of SwiGLU experts (Tiny-ONN) instead
    /// of the GELU MLP (`mlp_ratio` is then unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Every block's MLP is one dense SwiGLU MLP of this hidden width
    /// instead of the GELU MLP (the dense baseline of a mixture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swiglu: Option<usize>,
}

fn four() -> usize {
    4
}

impl GptConfig {
    /// The reference size: 4 layers of width 128 with 4 heads, context 16.
    pub fn reference(vocab: usize) -> Self {
        GptConfig {
            vocab,
            context: 16,
            width: 128,
            layers: 4,
            heads: 4,
            mlp_ratio: 4,
            tied_head: false,
            moe: None,
            swiglu: None,
        }
    }

    /// Names and shapes of the parameters, in order: `tok_emb [V, d]`,
    /// `pos_emb [context, d]`; per layer `l{i}.ln1.{g,b}`,
    /// `l{i}.attn.qkv.{w [d, 3d], b}`, `l{i}.attn.proj.{w [d, d], b}`,
    /// `l{i}.ln2.{g,b}`, `l{i}.mlp.fc.{w [d, r d], b}`,
    /// `l{i}.mlp.proj.{w [r d, d], b}`; `ln_f.{g,b}`; `head.w [d, V]`
    /// unless the head is tied. With [`GptConfig::moe`] (`E` experts of
    /// hidden width `H`) the MLP's are `l{i}.moe.router.{w [d, E], b [E]}`,
    /// `l{i}.moe.w1 [d, E H]`, `l{i}.moe.w3 [d, E H]` and
    /// `l{i}.moe.w2 [E H, d]` (expert `e` owns columns, or rows of `w2`,
    /// `e H .. (e + 1) H`); with [`GptConfig::swiglu`] (`S`) they are
    /// `l{i}.mlp.w1 [d, S]`, `l{i}.mlp.w3 [d, S]` and `l{i}.mlp.w2 [S, d]`.
    /// SwiGLU MLPs have no biases.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, h) = (self.width, self.width * self.mlp_ratio);
        let mut v = vec![
            ("tok_emb".to_string(), vec![self.vocab, d]),
            ("pos_emb".to_string(), vec![self.context, d]),
        ];
        for l in 0..self.layers {
            for (name, shape) in [
                ("ln1.g", vec![d]),
                ("ln1.b", vec![d]),
                ("attn.qkv.w", vec![d, 3 * d]),
                ("attn.qkv.b", vec![3 * d]),
                ("attn.proj.w", vec![d, d]),
                ("attn.proj.b", vec![d]),
                ("ln2.g", vec![d]),
                ("ln2.b", vec![d]),
            ] {
                v.push((format!("l{l}.{name}"), shape));
            }
            let mlp: Vec<(&str, Vec<usize>)> = match (&self.moe, self.swiglu) {
                (Some(m), _) => {
                    let (e, eh) = (m.experts, m.experts * m.hidden);
                    vec![
                        ("moe.router.w", vec![d, e]),
                        ("moe.router.b", vec![e]),
                        ("moe.w1", vec![d, eh]),
                        ("moe.w3", vec![d, eh]),
                        ("moe.w2", vec![eh, d]),
                    ]
                }
                (None, Some(hs)) => vec![
                    ("mlp.w1", vec![d, hs]),
                    ("mlp.w3", vec![d, hs]),
                    ("mlp.w2", vec![hs, d]),
                ],
                (None, None) => vec![
                    ("mlp.fc.w", vec![d, h]),
                    ("mlp.fc.b", vec![h]),
                    ("mlp.proj.w", vec![h, d]),
                    ("mlp.proj.b", vec![d]),
                ],
            };
            for (name, shape) in mlp {
                v.push((format!("l{l}.{name}"), shape));
            }
        }
        v.push(("ln_f.g".into(), vec![d]));
        v.push(("ln_f.b".into(), vec![d]));
        if !self.tied_head {
            v.push(("head.w".into(), vec![d, self.vocab]));
        }
        v
    }

    /// Every size at least 1 and the width a multiple of the heads, with the
    /// offending key named.
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("vocab", self.vocab),
            ("context", self.context),
            ("width", self.width),
            ("layers", self.layers),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
        ] {
            if v == 0 {
                return Err(format!("model key '{key}' must be at least 1, got 0"));
            }
        }
        if self.moe.is_some() && self.swiglu.is_some() {
            return Err("model keys 'moe' and 'swiglu' exclude each other".into());
        }
        if let Some(m) = &self.moe {
            m.validate()?;
        }
        if self.swiglu == Some(0) {
            return Err("model key 'swiglu' must be at least 1, got 0".into());
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "model key 'width' ({}) must be a multiple of 'heads' ({})",
                self.width, self.heads
            ));
        }
        Ok(())
    }
}

/// The shape of a seeded fact world (the runtime's
/// `metac_runtime::data::facts::FactWorld` generates it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorldConfig {
    pub seed: u64,
    pub subjects: usize,
    pub relations: usize,
    /// Object vocabulary size of each relation, drawn in `[min, max]`.
    pub objects: (usize, usize),
    /// Training templates and held-out paraphrases per relation.
    pub train_templates: usize,
    pub heldout_templates: usize,
    /// Longest prompt plus answer, in tokens.
    pub context: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            subjects: 3000,
            relations: 10,
            objects: (20, 80),
            train_templates: 4,
            heldout_templates: 2,
            context: 16,
        }
    }
}

/// What a language model learns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LmData {
    /// The prompts of a seeded fact world, one answer (the object) each.
    Facts(WorldConfig),
}

/// The `[model]` table: the [`GptConfig`] without the vocabulary, which
/// comes from the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    #[serde(default = "sixteen")]
    pub context: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    #[serde(default)]
    pub tied_head: bool,
    /// `[model.moe]`: mixture-of-experts MLPs ([`GptConfig::moe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// A dense SwiGLU MLP of this hidden width ([`GptConfig::swiglu`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swiglu: Option<usize>,
}

fn sixteen() -> usize {
    16
}

impl ModelTable {
    pub fn with_vocab(&self, vocab: usize) -> GptConfig {
        GptConfig {
            vocab,
            context: self.context,
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            mlp_ratio: self.mlp_ratio,
            tied_head: self.tied_head,
            moe: self.moe.clone(),
            swiglu: self.swiglu,
        }
    }
}

/// The `[train]` table: the compiled training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTable {
    /// Prompts per training step.
    pub batch: usize,
    /// Prompts per `evaluate` call.
    #[serde(default = "thousand")]
    pub eval_batch: usize,
    /// Adam (PyTorch form, bias-corrected); baked into `train_step`.
    pub lr: f64,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
}

fn thousand() -> usize {
    1000
}
pub(crate) fn beta1() -> f64 {
    0.9
}
pub(crate) fn beta2() -> f64 {
    0.999
}
pub(crate) fn eps() -> f64 {
    1e-8
}

/// The `[run]` table: how `metac run` trains an LM bundle (changing it
/// recompiles nothing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmRunSettings {
    /// Passes over the training prompts; one iteration of the driver each.
    pub epochs: usize,
    /// Seeds the initial parameters and the order of the prompts.
    #[serde(default)]
    pub seed: u64,
    /// Validate every this many epochs (0 = never).
    #[serde(default = "one")]
    pub evaluation_period: usize,
    /// The learning rate over the run: `constant`, or `cosine` (from the
    /// compiled rate down to 0 at the last step).
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Epochs of linear warm-up from 0 (may be fractional).
    #[serde(default)]
    pub warmup_epochs: f64,
}

/// How the learning rate changes over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    Cosine,
}

impl LrSchedule {
    /// The learning rate's multiplier at `step` of `total` steps with
    /// `warmup` steps of linear warm-up from 0.
    pub fn scale(self, step: usize, total: usize, warmup: usize) -> f32 {
        if step < warmup {
            return (step + 1) as f32 / warmup as f32;
        }
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let x = ((step - warmup) as f64 / span).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * x).cos())) as f32
            }
        }
    }
}

impl LmRunSettings {
    /// The learning rate's multiplier at `step` of `total` steps with
    /// `warmup` warm-up steps.
    pub fn lr_scale(&self, step: usize, total: usize, warmup: usize) -> f32 {
        self.schedule.scale(step, total, warmup)
    }
}

fn one() -> usize {
    1
}

impl Default for LmRunSettings {
    fn default() -> Self {
        LmRunSettings {
            epochs: 20,
            seed: 0,
            evaluation_period: 1,
            schedule: LrSchedule::Constant,
            warmup_epochs: 0.0,
        }
    }
}

impl LmRunSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.epochs > 0,
            "config key 'run.epochs' must be at least 1, got 0"
        );
        ensure!(
            self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0,
            "config key 'run.warmup_epochs' must be a finite number >= 0, got {}",
            self.warmup_epochs
        );
        Ok(())
    }
}

/// A language-model config file (`configs/lm.toml`): `[world]`, `[model]`,
/// `[train]` shape the bundle; `[run]` the training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmConfig {
    /// The fact world (defaults: the reference world).
    #[serde(default)]
    pub world: WorldConfig,
    pub model: ModelTable,
    pub train: TrainTable,
    #[serde(default)]
    pub run: LmRunSettings,
}

impl LmConfig {
    /// Parse and check a TOML config; errors name the key.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: LmConfig = toml::from_str(text).context("invalid lm config")?;
        c.validate()?;
        Ok(c)
    }

    /// Read, parse and check a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading lm config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Every value in range, with the offending key named.
    pub fn validate(&self) -> Result<()> {
        self.model
            .with_vocab(1)
            .validate()
            .map_err(anyhow::Error::msg)?;
        ensure!(
            self.model.context >= self.world.context,
            "config key 'model.context' ({}) must hold the world's prompts (world.context = {})",
            self.model.context,
            self.world.context
        );
        let t = &self.train;
        ensure!(t.batch > 0, "config key 'train.batch' must be at least 1");
        ensure!(
            t.eval_batch > 0,
            "config key 'train.eval_batch' must be at least 1"
        );
        for (k, v) in [("train.lr", t.lr), ("train.eps", t.eps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("config key '{k}' must be a finite number > 0, got {v}");
            }
        }
        for (k, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("config key '{k}' must be in [0, 1), got {v}");
            }
        }
        self.run.validate()
    }
}

/// The typed metadata of an LM bundle: `meta.lm` of its manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmMeta {
    /// The compile config as given (without `[run]`), for people.
    pub config: serde_json::Value,
    pub model: GptConfig,
    pub data: LmData,
    /// Tokens per sequence of the compiled batches (`T`).
    pub seq: usize,
    /// Prompts per `train_step` (`B`) and per `evaluate` call (`E`).
    pub batch: usize,
    pub eval_batch: usize,
    /// Names of `train_step`'s inputs and outputs.
    pub train_step: TrainStepIo,
    /// `train_step`'s scalar input that multiplies Adam's learning rate
    /// (the run's schedule).
    pub lr_scale: String,
    /// How the parameters start (drawn with the run's seed) and how the
    /// optimizer's state starts, in `train_step`'s input order.
    pub init: Vec<TensorInit>,
    pub state_init: Vec<TensorInit>,
}

impl LmMeta {
    /// The `meta.lm` of `m`, which must be an LM bundle.
    pub fn from_manifest(m: &Manifest) -> Result<Self> {
        ensure!(
            m.kind == LM_KIND,
            "this is a '{}' bundle, not a language-model ('{LM_KIND}') bundle",
            m.kind
        );
        let v = m
            .meta
            .get("lm")
            .context("manifest has no meta.lm (not a language-model bundle)")?;
        serde_json::from_value(v.clone()).context("malformed meta.lm")
    }

    /// As the manifest's `meta` value.
    pub fn to_meta(&self) -> serde_json::Value {
        serde_json::json!({ "lm": self })
    }
}

/// The `[run]` table of the TOML config at `path` (defaults without one).
pub fn lm_run_settings(path: &Path) -> Result<LmRunSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .context("invalid TOML")
        .with_context(|| format!("in {}", path.display()))?;
    let s: LmRunSettings = match table.get("run") {
        None => LmRunSettings::default(),
        Some(v) => v
            .clone()
            .try_into()
            .context("invalid [run] table (config key 'run')")
            .with_context(|| format!("in {}", path.display()))?,
    };
    s.validate()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(s)
}
