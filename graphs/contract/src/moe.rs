//! The mixture-of-experts workload's contract (Tiny-ONN): the shape of a
//! block's mixture ([`MoeConfig`]), the compile config of a byte-level LM
//! trained on text ([`MoeLmConfig`], a TOML file: `[model]`, `[train]`,
//! `[router]`, `[run]`), its run settings ([`MoeRunSettings`]) and the typed
//! metadata of its bundle ([`MoeMeta`], `meta.moe` of the manifest).
//!
//! A MoE bundle holds four graphs (names in [`MoeMeta`]):
//! * `train_step`: parameters, both optimizers' states, a batch of windows
//!   (`tokens`, `targets`, i64 `[B, T]`) and the schedules' multipliers in;
//!   the new parameters and states, the batch's `loss` (before the update)
//!   and the router's measurements out. With `[train] mode = "hyper"` it is
//!   the two-backward hyper step; with `"joint"` one backward of the main
//!   loss (plus an optional load-balancing loss) and one Adam over all
//!   parameters (the baselines);
//! * `evaluate`: parameters and a batch of windows in; the summed
//!   next-byte negative log-likelihood (`nll_sum`) and, per block, the mean
//!   number of active experts out;
//! * `probe`: parameters and a batch in; per block the surprise
//!   (`surprise.l{i}`, `[B T, E]`), active experts and gates, and the loss;
//! * `logits`: parameters and `tokens [1, T]` in; `logits [1, T, 256]` out
//!   (sampling).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::init::TensorInit;
use crate::lm::{GptConfig, LrSchedule, ModelTable};

/// Bundle kind of a mixture-of-experts LM bundle.
pub const MOE_KIND: &str = "moe";
pub const MOE_TRAIN_STEP: &str = "train_step";
pub const MOE_EVALUATE: &str = "evaluate";
pub const MOE_PROBE: &str = "probe";
pub const MOE_LOGITS: &str = "logits";
/// The byte vocabulary.
pub const MOE_VOCAB: usize = 256;

/// A block's mixture of SwiGLU experts and how a token picks its experts.
///
/// Every expert is evaluated on every token (static shapes); a token's
/// *active* experts are taken in decreasing router probability until their
/// cumulative probability reaches `budget`, with at least `min_k` and at
/// most `max_k` of them. The output is the active experts' outputs weighted
/// by their probabilities renormalised over the active set. A fixed top-k
/// router is `min_k = max_k = k` with `budget = 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per block.
    pub experts: usize,
    /// Hidden width of each expert's SwiGLU.
    pub hidden: usize,
    /// Cumulative router probability that ends a token's selection, in
    /// `(0, 1]`.
    pub budget: f64,
    #[serde(default = "one")]
    pub min_k: usize,
    /// At most this many experts per token (default: all).
    #[serde(default)]
    pub max_k: Option<usize>,
}

fn one() -> usize {
    1
}

impl MoeConfig {
    /// The most experts a token may take.
    pub fn max_k(&self) -> usize {
        self.max_k.unwrap_or(self.experts)
    }

    /// An error naming the key (`model.moe.*`) of a value out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.experts == 0 {
            return Err("model.moe key 'experts' must be at least 1, got 0".into());
        }
        if self.hidden == 0 {
            return Err("model.moe key 'hidden' must be at least 1, got 0".into());
        }
        if !(self.budget > 0.0 && self.budget <= 1.0) {
            return Err(format!(
                "model.moe key 'budget' must be in (0, 1], got {}",
                self.budget
            ));
        }
        let max_k = self.max_k();
        if max_k == 0 || max_k > self.experts {
            return Err(format!(
                "model.moe key 'max_k' must be in 1..={} (the experts), got {max_k}",
                self.experts
            ));
        }
        if self.min_k == 0 || self.min_k > max_k {
            return Err(format!(
                "model.moe key 'min_k' must be in 1..={max_k} (max_k), got {}",
                self.min_k
            ));
        }
        Ok(())
    }
}

/// How `train_step` trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// The two-backward hyper step: the main loss's gradient for every
    /// parameter but the routers' and the surprise; the router loss's
    /// gradient for the routers; an Adam for each part.
    #[default]
    Hyper,
    /// One backward of the main loss (plus `balance` times a load-balancing
    /// loss) and one Adam over every parameter: the single-backward MoE and
    /// the dense model.
    Joint,
}

/// The `[train]` table: the compiled step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeTrainTable {
    #[serde(default)]
    pub mode: TrainMode,
    /// Windows per step (`B`); each is the model's context long.
    pub batch: usize,
    /// Windows per `evaluate` call.
    #[serde(default = "sixteen")]
    pub eval_batch: usize,
    /// Adam of every parameter but the routers' (all of them in `joint`).
    pub lr: f64,
    /// Adam of the routers (`hyper` only).
    #[serde(default = "default_router_lr")]
    pub router_lr: f64,
    #[serde(default = "crate::lm::beta1")]
    pub beta1: f64,
    #[serde(default = "crate::lm::beta2")]
    pub beta2: f64,
    #[serde(default = "crate::lm::eps")]
    pub eps: f64,
    /// Weight of the Switch Transformer's load-balancing loss,
    /// `E * sum_e f_e P_e` per block (`joint` with a mixture only).
    #[serde(default)]
    pub balance: f64,
}

fn sixteen() -> usize {
    16
}
fn default_router_lr() -> f64 {
    1e-3
}

/// The `[router]` table: the router loss of the hyper step. Its weights are
/// inputs of `train_step` (changing them recompiles nothing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterTable {
    /// Weight of `KL(softmax(-surprise / tau) || p)`.
    #[serde(default)]
    pub kl: f64,
    /// `tau`, relative to the token's mean surprise.
    #[serde(default = "one_f")]
    pub tau: f64,
    /// Weight of the router distribution's entropy (the stand-in for a
    /// penalty on the number of active experts).
    #[serde(default)]
    pub k_penalty: f64,
}

fn one_f() -> f64 {
    1.0
}

impl Default for RouterTable {
    fn default() -> Self {
        RouterTable {
            kl: 0.0,
            tau: 1.0,
            k_penalty: 0.0,
        }
    }
}

/// The `[run]` table: how `metac run` trains a MoE bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeRunSettings {
    /// Training steps in all.
    pub steps: usize,
    /// Steps per iteration of the driver (a line of metrics.jsonl, a
    /// checkpoint).
    #[serde(default = "hundred")]
    pub steps_per_iteration: usize,
    /// Validate every this many iterations (0 = never).
    #[serde(default = "one")]
    pub evaluation_period: usize,
    /// Held-out windows per validation (at most; the held-out text may
    /// hold fewer).
    #[serde(default = "default_eval_windows")]
    pub eval_windows: usize,
    /// Every `heldout_every`-th document of the corpus is held out.
    #[serde(default = "twenty")]
    pub heldout_every: usize,
    #[serde(default)]
    pub seed: u64,
    /// Both learning rates over the run.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Steps of linear warm-up from 0.
    #[serde(default)]
    pub warmup_steps: usize,
}

fn hundred() -> usize {
    100
}
fn twenty() -> usize {
    20
}
fn default_eval_windows() -> usize {
    64
}

impl Default for MoeRunSettings {
    fn default() -> Self {
        MoeRunSettings {
            steps: 1000,
            steps_per_iteration: 100,
            evaluation_period: 1,
            eval_windows: 64,
            heldout_every: 20,
            seed: 0,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
        }
    }
}

impl MoeRunSettings {
    /// The learning rates' multiplier at `step`.
    pub fn lr_scale(&self, step: usize) -> f32 {
        self.schedule.scale(step, self.steps, self.warmup_steps)
    }

    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("run.steps", self.steps),
            ("run.steps_per_iteration", self.steps_per_iteration),
            ("run.eval_windows", self.eval_windows),
        ] {
            ensure!(v > 0, "config key '{k}' must be at least 1, got 0");
        }
        ensure!(
            self.heldout_every >= 2,
            "config key 'run.heldout_every' must be at least 2, got {}",
            self.heldout_every
        );
        Ok(())
    }
}

/// A MoE LM config file (`configs/moe*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLmConfig {
    /// The model; the vocabulary is the 256 bytes.
    pub model: ModelTable,
    pub train: MoeTrainTable,
    #[serde(default)]
    pub router: RouterTable,
    #[serde(default)]
    pub run: MoeRunSettings,
}

impl MoeLmConfig {
    /// Parse and check a TOML config; errors name the key.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: MoeLmConfig = toml::from_str(text).context("invalid moe config")?;
        c.validate()?;
        Ok(c)
    }

    /// Read, parse and check a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading moe config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The model's shape.
    pub fn gpt(&self) -> GptConfig {
        self.model.with_vocab(MOE_VOCAB)
    }

    /// Every value in range, with the offending key named.
    pub fn validate(&self) -> Result<()> {
        self.gpt().validate().map_err(anyhow::Error::msg)?;
        let t = &self.train;
        ensure!(
            t.batch > 0,
            "config key 'train.batch' must be at least 1, got 0"
        );
        ensure!(
            t.eval_batch > 0,
            "config key 'train.eval_batch' must be at least 1, got 0"
        );
        for (k, v) in [
            ("train.lr", t.lr),
            ("train.router_lr", t.router_lr),
            ("train.eps", t.eps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("config key '{k}' must be a finite number > 0, got {v}");
            }
        }
        for (k, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("config key '{k}' must be in [0, 1), got {v}");
            }
        }
        let r = &self.router;
        for (k, v) in [
            ("train.balance", t.balance),
            ("router.kl", r.kl),
            ("router.k_penalty", r.k_penalty),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("config key '{k}' must be a finite number >= 0, got {v}");
            }
        }
        if !(r.tau.is_finite() && r.tau > 0.0) {
            bail!(
                "config key 'router.tau' must be a finite number > 0, got {}",
                r.tau
            );
        }
        if t.mode == TrainMode::Hyper {
            ensure!(
                self.model.moe.is_some(),
                "config key 'train.mode' is \"hyper\", which needs a mixture ([model.moe])"
            );
        }
        if t.balance > 0.0 {
            ensure!(
                self.model.moe.is_some() && t.mode == TrainMode::Joint,
                "config key 'train.balance' needs a mixture ([model.moe]) and train.mode = \"joint\""
            );
        }
        self.run.validate()
    }
}

/// The typed metadata of a MoE bundle: `meta.moe` of its manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeMeta {
    /// The compile config as given (without `[run]`), for people.
    pub config: serde_json::Value,
    pub model: GptConfig,
    pub mode: TrainMode,
    /// Windows per `train_step` (`B`) and per `evaluate` call; every
    /// window is `model.context` tokens.
    pub batch: usize,
    pub eval_batch: usize,
    /// Parameter names (inputs of every graph), and which of them the
    /// router optimizer updates (the rest: the main optimizer).
    pub params: Vec<String>,
    pub router_params: Vec<String>,
    /// Optimizer-state names (inputs of `train_step`; outputs `new.{name}`).
    pub state: Vec<String>,
    /// `train_step`'s scalar inputs: the main and router learning-rate
    /// multipliers, and the router loss's weights.
    pub lr_scale: String,
    pub router_lr_scale: Option<String>,
    pub router_kl: Option<String>,
    pub router_k_penalty: Option<String>,
    /// `train_step`'s scalar outputs besides `loss`, in order (per block:
    /// `router_loss.l{i}`, `gating_accuracy.l{i}`, `mean_k.l{i}`, ...).
    pub metrics: Vec<String>,
    pub init: Vec<TensorInit>,
    pub state_init: Vec<TensorInit>,
}

impl MoeMeta {
    /// The `meta.moe` of `m`, which must be a MoE bundle.
    pub fn from_manifest(m: &Manifest) -> Result<Self> {
        ensure!(
            m.kind == MOE_KIND,
            "this is a '{}' bundle, not a mixture-of-experts ('{MOE_KIND}') bundle",
            m.kind
        );
        let v = m
            .meta
            .get("moe")
            .context("manifest has no meta.moe (not a mixture-of-experts bundle)")?;
        serde_json::from_value(v.clone()).context("malformed meta.moe")
    }

    /// As the manifest's `meta` value.
    pub fn to_meta(&self) -> serde_json::Value {
        serde_json::json!({ "moe": self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moe() -> MoeConfig {
        MoeConfig {
            experts: 16,
            hidden: 32,
            budget: 0.5,
            min_k: 1,
            max_k: Some(4),
        }
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        assert!(moe().validate().is_ok());
        for (m, key) in [
            (
                MoeConfig {
                    experts: 0,
                    ..moe()
                },
                "'experts'",
            ),
            (
                MoeConfig {
                    budget: 0.0,
                    ..moe()
                },
                "'budget'",
            ),
            (
                MoeConfig {
                    budget: 1.5,
                    ..moe()
                },
                "'budget'",
            ),
            (
                MoeConfig {
                    budget: f64::NAN,
                    ..moe()
                },
                "'budget'",
            ),
            (
                MoeConfig {
                    max_k: Some(17),
                    ..moe()
                },
                "'max_k'",
            ),
            (MoeConfig { min_k: 5, ..moe() }, "'min_k'"),
            (MoeConfig { min_k: 0, ..moe() }, "'min_k'"),
        ] {
            let e = m.validate().unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    const GOOD: &str = r#"
[model]
context = 32
width = 16
layers = 1
heads = 2
[model.moe]
experts = 4
hidden = 8
budget = 0.5
[train]
batch = 2
lr = 1e-3
[run]
steps = 10
"#;

    #[test]
    fn configs_parse_and_bad_values_name_their_key() {
        let c = MoeLmConfig::from_toml_str(GOOD).unwrap();
        assert_eq!(c.gpt().vocab, 256);
        assert_eq!(c.train.mode, TrainMode::Hyper);
        for (from, to, key) in [
            ("experts = 4", "experts = 0", "'experts'"),
            ("budget = 0.5", "budget = 1.5", "'budget'"),
            ("budget = 0.5", "budget = 0.5\nmax_k = 5", "'max_k'"),
            ("lr = 1e-3", "lr = -1.0", "'train.lr'"),
            ("steps = 10", "steps = 0", "'run.steps'"),
            ("batch = 2", "batch = 2\nbalance = 0.01", "'train.balance'"),
        ] {
            let bad = GOOD.replace(from, to);
            let e = format!("{:#}", MoeLmConfig::from_toml_str(&bad).unwrap_err());
            assert!(e.contains(key), "{to}: {e}");
        }
        let no_moe = GOOD.replace("[model.moe]\nexperts = 4\nhidden = 8\nbudget = 0.5\n", "");
        let e = format!("{:#}", MoeLmConfig::from_toml_str(&no_moe).unwrap_err());
        assert!(e.contains("'train.mode'"), "{e}");
    }
}
