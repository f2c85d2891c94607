//! The model-editing workload's contract (MALMEN): the config
//! ([`EditorConfig`], a TOML file), the run settings ([`EditorRunSettings`],
//! its `[run]` table) and the typed metadata of an editor bundle
//! ([`EditorMeta`], `meta.editor` of its manifest).
//!
//! An editor bundle edits a language model (its shape and fact world come
//! from the LM's config; its weights from a safetensors file) and holds the
//! graphs of `metac_compiler::models::editor` for chunks of `chunk` edits:
//!
//! | graph | inputs | outputs |
//! |---|---|---|
//! | `cache` | LM parameters, `tokens`, `positions`, `answers`, `weights` | `u.{layer}`, `delta.{layer}` |
//! | `values` | hypernetwork (without `hyper.lamda`), `norm.g{k}.{mean,std}`, `u.{layer}`, `delta.{layer}` | `d.{layer}` |
//! | `values_vjp` | as `values`, and `dd.{layer}` | `grad.{hyper param}` |
//! | `meta_loss` | LM parameters, `ce.{tokens,positions,answers,weights}`, `kl.{tokens,positions,weights,ref_logp}` | `loss`, `grad.{layer}.w` |
//! | `logp` | LM parameters, `tokens`, `positions` | `logp` |
//! | `evaluate` | LM parameters, `tokens`, `positions`, `answers` | `nll`, `correct` |
//! | `hyper_adam` | hypernetwork, `grad.{name}`, Adam's state | `new.{name}` |
//! | `ft_adam` | edited layers' weights `{layer}.w`, `grad.{layer}.w`, Adam's state, `lr_scale` (the learning rate) | `new.{name}` |
//!
//! `ft_adam` is the fine-tuning baseline's step (`metac edit --method ft`):
//! Adam on the edited layers with `meta_loss`'s gradient.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::init::TensorInit;
use crate::lm::{GptConfig, WorldConfig};

/// Bundle kind of an editor bundle.
pub const EDITOR_KIND: &str = "editor";
pub const CACHE: &str = "cache";
pub const VALUES: &str = "values";
pub const VALUES_VJP: &str = "values_vjp";
pub const META_LOSS: &str = "meta_loss";
pub const LOGP: &str = "logp";
pub const EVALUATE: &str = "evaluate";
pub const HYPER_ADAM: &str = "hyper_adam";
pub const FT_ADAM: &str = "ft_adam";
/// `ft_adam`'s learning-rate input.
pub const FT_LR: &str = "lr_scale";

/// How the values become a layer's shift.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Solver {
    /// MALMEN: the least-squares shift `(U^T U + lambda I)^{-1} U^T D`.
    #[default]
    LeastSquares,
    /// MEND's rule: the sum of the edits' rank-one shifts, `U^T D`.
    Sum,
}

/// The `[lm]` table: the language model that is edited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmTable {
    /// Its config (`configs/lm.toml`: the `[world]` and `[model]` tables).
    pub config: PathBuf,
    /// Its weights (safetensors, e.g. `models/lm-facts.safetensors` or a
    /// run's `best.safetensors`).
    pub weights: PathBuf,
}

/// The `[editor]` table: what is edited and the hypernetwork's size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorTable {
    /// Edited linear layers (`l3.mlp.proj`, ...).
    pub layers: Vec<String>,
    #[serde(default = "rank")]
    pub rank: usize,
    #[serde(default = "two")]
    pub blocks: usize,
    /// Initial per-layer learning rate of the values.
    #[serde(default = "lr_init")]
    pub lr_init: f64,
    /// Edits per graph call (larger edit batches run in chunks).
    #[serde(default = "chunk")]
    pub chunk: usize,
    /// Unrelated prompts per edit.
    #[serde(default = "one")]
    pub unrelated: usize,
    /// `least-squares` (MALMEN) or `sum` (MEND's sum of rank-one shifts,
    /// the baseline).
    #[serde(default)]
    pub solver: Solver,
    /// Learn the per-layer learning rate in log space (Adam's step then
    /// changes it relatively; see docs/results.md).
    #[serde(default)]
    pub log_lr: bool,
    /// The least-squares penalty: with 0, MALMEN's `lambda |S|^2`; with
    /// `P > 0`, MEMIT's `lambda tr(S^T C S)`, `C` the second moment of the
    /// edited layer's keys over `P` training-template prompts of the world
    /// (scaled to a mean eigenvalue of 1): shifts are cheap in directions
    /// the model's other prompts do not use.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preserve: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn rank() -> usize {
    64
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn lr_init() -> f64 {
    1e-3
}
fn chunk() -> usize {
    256
}

/// The `[meta]` table: the meta-loss and the hypernetwork's optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaTable {
    /// Adam's learning rate on the hypernetwork.
    #[serde(default = "meta_lr")]
    pub lr: f64,
    /// Weights of the meta-loss terms: cross-entropy of the new answer on
    /// the edit prompts and on their equivalent prompts, and the KL of the
    /// unrelated prompts' answers from the unedited model's. All three by
    /// default, as the seed; MALMEN's public code has no edit term
    /// (`edit = 0`).
    #[serde(default = "unit")]
    pub edit: f64,
    #[serde(default = "unit")]
    pub equivalent: f64,
    #[serde(default = "unit")]
    pub locality: f64,
    /// Largest global norm of the hypernetwork's gradient (0: no clipping).
    #[serde(default = "unit")]
    pub clip: f64,
    /// Which model's answers the locality KL keeps: `unedited` (the LM
    /// before any edit of the trajectory, what LS measures against) or
    /// `current` (the LM before this batch's edit, earlier sequential edits
    /// included).
    #[serde(default)]
    pub reference: LocalityReference,
}

/// See [`MetaTable::reference`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalityReference {
    #[default]
    Unedited,
    Current,
}

fn meta_lr() -> f64 {
    1e-4
}
fn unit() -> f64 {
    1.0
}

/// The `[run]` table: the seed's training loop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorRunSettings {
    /// Trajectories (iterations of the driver): each edits `batches`
    /// batches, updates the hypernetwork, resets the LM and validates.
    pub trajectories: usize,
    /// Batches of edits per trajectory.
    #[serde(default = "twenty")]
    pub batches: usize,
    /// Edits per batch.
    pub edits: usize,
    /// Batches whose meta-gradients are summed per hypernetwork update (0:
    /// all of a trajectory's, one update per trajectory as the seed).
    #[serde(default)]
    pub accumulate: usize,
    /// Edits stay in the LM until the trajectory ends (the seed's), rather
    /// than being removed after each batch.
    #[serde(default = "yes")]
    pub sequential: bool,
    #[serde(default)]
    pub seed: u64,
    /// Validate every this many trajectories (0 = never).
    #[serde(default = "one")]
    pub evaluation_period: usize,
    /// Edits of the validation batch.
    #[serde(default = "hundred")]
    pub validation_edits: usize,
}

fn twenty() -> usize {
    20
}
fn yes() -> bool {
    true
}
fn hundred() -> usize {
    100
}

impl EditorRunSettings {
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("run.trajectories", self.trajectories),
            ("run.batches", self.batches),
            ("run.edits", self.edits),
            ("run.validation_edits", self.validation_edits),
        ] {
            ensure!(v > 0, "config key '{k}' must be at least 1, got 0");
        }
        Ok(())
    }

    /// Batches per hypernetwork update.
    pub fn batches_per_update(&self) -> usize {
        match self.accumulate {
            0 => self.batches,
            n => n.min(self.batches),
        }
    }
}

/// An editor config file (`configs/editor.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorConfig {
    pub lm: LmTable,
    pub editor: EditorTable,
    #[serde(default = "MetaTable::default")]
    pub meta: MetaTable,
    pub run: EditorRunSettings,
}

impl Default for MetaTable {
    fn default() -> Self {
        MetaTable {
            lr: meta_lr(),
            edit: 1.0,
            equivalent: 1.0,
            locality: 1.0,
            clip: 1.0,
            reference: LocalityReference::Unedited,
        }
    }
}

impl EditorConfig {
    /// Parse and check a TOML config; errors name the key.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: EditorConfig = toml::from_str(text).context("invalid editor config")?;
        c.validate()?;
        Ok(c)
    }

    /// Read, parse and check a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading editor config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Every value in range, with the offending key named.
    pub fn validate(&self) -> Result<()> {
        let e = &self.editor;
        ensure!(
            !e.layers.is_empty(),
            "config key 'editor.layers' must name at least one layer"
        );
        for (k, v) in [
            ("editor.rank", e.rank),
            ("editor.blocks", e.blocks),
            ("editor.chunk", e.chunk),
            ("editor.unrelated", e.unrelated),
        ] {
            ensure!(v > 0, "config key '{k}' must be at least 1, got 0");
        }
        let m = &self.meta;
        for (k, v) in [("editor.lr_init", e.lr_init), ("meta.lr", m.lr)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("config key '{k}' must be a finite number > 0, got {v}");
            }
        }
        for (k, v) in [
            ("meta.edit", m.edit),
            ("meta.equivalent", m.equivalent),
            ("meta.locality", m.locality),
            ("meta.clip", m.clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("config key '{k}' must be a finite number >= 0, got {v}");
            }
        }
        ensure!(
            e.preserve == 0 || e.solver == Solver::LeastSquares,
            "config key 'editor.preserve' applies to the least-squares solver; editor.solver is \"sum\""
        );
        ensure!(
            m.edit + m.equivalent + m.locality > 0.0,
            "the meta-loss has no term: meta.edit, meta.equivalent and meta.locality are all 0"
        );
        self.run.validate()
    }
}

/// An edited layer as the bundle records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    pub group: usize,
}

/// The typed metadata of an editor bundle: `meta.editor` of its manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorMeta {
    /// The compile config as given (without `[run]`).
    pub config: serde_json::Value,
    pub model: GptConfig,
    pub world: WorldConfig,
    /// The LM's weights as the config names them, and their SHA-256.
    pub lm_weights: PathBuf,
    pub lm_weights_sha256: String,
    pub layers: Vec<LayerMeta>,
    /// Edits per graph call; tokens per prompt; equivalent and unrelated
    /// prompts per edit (the `meta_loss` batches are `chunk * (1 +
    /// equivalents)` and `chunk * unrelated` prompts).
    pub chunk: usize,
    pub seq: usize,
    pub equivalents: usize,
    pub unrelated: usize,
    /// Normaliser groups: the width `D = in + out` of each.
    pub norm_dims: Vec<usize>,
    /// Meta-loss weights and gradient clipping.
    pub meta: MetaTable,
    /// Init rules of the hypernetwork and of its Adam state.
    pub hyper_init: Vec<TensorInit>,
    pub adam_init: Vec<TensorInit>,
    #[serde(default)]
    pub solver: Solver,
    /// `[editor] preserve`: prompts whose keys make the least-squares
    /// regulariser (0: the identity).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preserve: usize,
    /// Init rules of `ft_adam`'s state (fine-tuning the edited layers).
    #[serde(default)]
    pub ft_adam_init: Vec<TensorInit>,
}

impl EditorMeta {
    /// The `meta.editor` of `m`, which must be an editor bundle.
    pub fn from_manifest(m: &Manifest) -> Result<Self> {
        ensure!(
            m.kind == EDITOR_KIND,
            "this is a '{}' bundle, not an editor ('{EDITOR_KIND}') bundle",
            m.kind
        );
        let v = m
            .meta
            .get("editor")
            .context("manifest has no meta.editor")?;
        serde_json::from_value(v.clone()).context("malformed meta.editor")
    }

    /// As the manifest's `meta` value.
    pub fn to_meta(&self) -> serde_json::Value {
        serde_json::json!({ "editor": self })
    }
}

/// The `[run]` table of the editor config at `path`.
pub fn editor_run_settings(path: &Path) -> Result<EditorRunSettings> {
    Ok(EditorConfig::load(path)?.run)
}
