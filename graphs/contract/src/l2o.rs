//! The L2O workload's side of the contract: the names its bundle's graphs
//! and buffers use, the layout of those names by role ([`L2oLayout`]), the
//! typed metadata record of an L2O bundle ([`L2oMeta`], `meta.l2o` of the
//! manifest) with how to draw fresh optimizee parameters and optimizer
//! state ([`L2oInit`]), and the run-time settings of meta-training
//! ([`RunSettings`], the config's `[run]` table).
//!
//! The compiler (`metac_compiler::l2o`) writes an [`L2oMeta`]; the runtime
//! (`metac_runtime::l2o`) reads it with [`L2oMeta::from_manifest`] and needs
//! nothing else from the compiler to meta-train.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::init::TensorInit;
use crate::io::{EvalIo, TrainStepIo};

/// The manifest `kind` of an L2O bundle.
pub const KIND: &str = "l2o";

/// Prefix of a step output that replaces an input (`next.theta.w0`).
pub const NEXT: &str = "next.";
/// Prefix of a cotangent input of a VJP graph (`ct.next.theta.w0`).
pub const CT: &str = "ct.";
/// Prefix of a VJP graph's output, the cotangent of an input (`d.hrnn.update.w`).
pub const D: &str = "d.";
/// Name of the step's objective output (and, with [`CT`], of its cotangent).
pub const OBJECTIVE: &str = "objective";
/// The graph measuring the objective at several inner steps at once.
pub const OBJECTIVE_CHUNK: &str = "objective_chunk";
/// `step` without the regulariser (bundles with one also carry it, and its
/// VJP): validation runs it, and an unroll whose regulariser weight is 0
/// runs the VJP, skipping third-order terms it would not count.
pub const STEP_UNREGULARIZED: &str = "step_unregularized";
/// `step_vjp` without the regulariser; see [`STEP_UNREGULARIZED`].
pub const STEP_VJP_UNREGULARIZED: &str = "step_vjp_unregularized";
/// `t<k>.<name>`: the `k`-th parameter set of an `objective_chunk` graph and
/// its outputs.
pub fn chunk_name(k: usize, name: &str) -> String {
    format!("t{k}.{name}")
}
/// Name of the step's minibatch-loss output.
pub const MINIBATCH_LOSS: &str = "minibatch_loss";
/// Prefix of the step's outputs holding the gradient of the objective in the
/// new parameters (`objective_grad.theta.w0`).
pub const OBJECTIVE_GRAD: &str = "objective_grad.";

/// `next.<name>`.
pub fn next_name(name: &str) -> String {
    format!("{NEXT}{name}")
}
/// `ct.<name>`.
pub fn ct_name(name: &str) -> String {
    format!("{CT}{name}")
}
/// `d.<name>`.
pub fn d_name(name: &str) -> String {
    format!("{D}{name}")
}
/// `ms.<phi name>`: the meta-optimizer's accumulator of a meta-parameter.
pub fn ms_name(phi: &str) -> String {
    format!("ms.{phi}")
}
/// The bundle graph of the learned optimizer's `train_step` on the
/// training problem (`metac eval`).
pub const METATEST_LEARNED: &str = "metatest.learned";
/// The bundle graph evaluating parameters of the training problem
/// (`metac eval`).
pub const METATEST_EVALUATE: &str = "metatest.evaluate";
/// Examples per run of [`METATEST_EVALUATE`] (MNIST problems): `metac
/// eval`'s default evaluation chunk.
pub const METATEST_EVAL_BATCH: usize = 1000;
/// Name of the bundle graph of the compiled meta-optimizer.
pub const META_UPDATE: &str = "meta_update";
/// `objective_grad.<theta name>`.
pub fn objective_grad_name(theta: &str) -> String {
    format!("{OBJECTIVE_GRAD}{theta}")
}

/// The input names of an L2O bundle's graphs, by role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L2oLayout {
    /// Meta-parameters (the learned optimizer's weights), `hrnn.*`.
    pub phi: Vec<String>,
    /// Optimizee parameters, `theta.<param>`.
    pub theta: Vec<String>,
    /// Optimizer state, `hrnn.state.*`.
    pub state: Vec<String>,
    /// The state entries that the `reset` graph sets from `phi` (hidden states).
    pub hidden: Vec<String>,
    /// Minibatch inputs of `step` (`batch.<input>`), empty for data-free problems.
    pub batch: Vec<String>,
    /// Objective-set inputs of `step` and `objective` (`obj.<input>`).
    pub objective_batch: Vec<String>,
    /// Transposed copies of objective-set inputs that `step` reads:
    /// `(input name, source name)`, the source being a 2-D `obj.*` input.
    #[serde(default)]
    pub objective_transposed: Vec<(String, String)>,
    /// Parameter sets per `objective_chunk` run (0: a bundle from before
    /// that graph, which this runtime cannot run).
    #[serde(default)]
    pub objective_chunk: usize,
}

/// Name of the step's regulariser output (and, as `ct.reg`, of its cotangent).
pub const REG: &str = "reg";

/// When the regulariser counts (`regularize_time`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegularizeTime {
    /// Every unroll.
    All,
    /// Only unrolls with (0-based) index `> int(posterior_scale * n + 1)`
    /// of the `n` unrolls of a meta-iteration.
    Posterior,
    /// Never: the regulariser contributes 0 (it is still computed and logged).
    None,
}

/// How probe entries are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    /// +-1 with probability 1/2 each (Hutchinson).
    Rademacher,
    /// Standard normal (start vectors of power iteration and Lanczos).
    Normal,
}

/// One probe input of the step graphs: `[P, *param shape]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeInput {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The regulariser of a bundle as the runtime sees it (`meta.l2o.regularizer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegularizerSchedule {
    /// `reg_option` (for logs).
    pub option: String,
    /// Weight of `reg` in the meta-loss.
    pub alpha: f64,
    pub time: RegularizeTime,
    pub posterior_scale: f64,
    pub probe_kind: ProbeKind,
    /// The step graphs' probe inputs (empty for `jacob`).
    pub probes: Vec<ProbeInput>,
}

impl RegularizerSchedule {
    /// The weight of the regulariser in unroll `unroll` of `num_unrolls`.
    pub fn weight(&self, unroll: usize, num_unrolls: usize) -> f64 {
        match self.time {
            RegularizeTime::All => self.alpha,
            RegularizeTime::Posterior => {
                let first_excluded = (self.posterior_scale * num_unrolls as f64 + 1.0) as usize;
                if unroll > first_excluded {
                    self.alpha
                } else {
                    0.0
                }
            }
            RegularizeTime::None => 0.0,
        }
    }
}

/// The imitation settings and the `imitation_step` graph's names
/// (`meta.l2o.imitation` of a bundle).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImitationSpec {
    /// Probability that a meta-iteration imitates.
    pub mt_ratio: f64,
    /// Adam steps per label.
    pub mt_k: usize,
    /// Weight of the MSE in the meta-loss.
    pub weight: f64,
    /// Adam's learning rate (compiled into the graph; for logs).
    pub lr: f64,
    /// The graph of the bundle.
    pub graph: String,
    /// `(graph input, layout theta name)` for each parameter.
    pub params: Vec<(String, String)>,
    /// `(graph input, layout minibatch name)` for each batch input.
    pub batch: Vec<(String, String)>,
    /// Adam's state inputs and shapes (zeros at the start).
    pub state: Vec<(String, Vec<usize>)>,
    /// Output names: new parameters (in `params` order) and new state.
    pub new_params: Vec<String>,
    pub new_state: Vec<String>,
}

/// Curriculum learning: the stage list and the switching rule (the
/// runtime's `l2o::curriculum` applies it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Curriculum {
    /// Inner steps per meta-iteration at each stage, strictly increasing,
    /// each a multiple of the unroll length.
    pub steps: Vec<usize>,
    /// Validations at a stage before it may switch.
    pub min_num_eval: usize,
}

/// The meta-optimizer's RMSProp settings (compiled into `meta_update`;
/// the runtime's host RMSProp, the reference, reads them too).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsPropConfig {
    pub lr: f64,
    pub decay: f64,
    pub eps: f64,
    pub clip: f64,
    pub accumulator_init: f64,
}

/// Where a problem's batches come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    /// MNIST: `x f32[B,784]` (pixels scaled to [0,1]), `y i64[B]` (0..10).
    Mnist,
    /// Token sequences of the fact world (`metac_runtime::data::facts`):
    /// `tokens i64[B,T]`, `targets i64[B,T]` (the next tokens), `weights
    /// f32[B,T]` (1 where a target counts).
    Facts,
}

/// How the runtime draws a fresh problem for an unroll or a validation:
/// the optimizee parameters in `layout.theta` order and the optimizer
/// state in `layout.state` order (hidden states zero: `reset` sets them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct L2oInit {
    pub theta: Vec<TensorInit>,
    pub state: Vec<TensorInit>,
}

/// The typed metadata of an L2O bundle: `meta.l2o` of its manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2oMeta {
    /// The compile config as given (the TOML without `[run]`), for people
    /// and for `metac eval`, which rebuilds the learned optimizer on other
    /// problems; meta-training reads the typed fields below.
    pub config: serde_json::Value,
    /// The optimizee problem's name (e.g. `mnist-mlp`).
    pub problem: String,
    /// Where its batches come from (`None`: data-free).
    pub data: Option<DataKind>,
    /// The run's seed (optimizee draws, batches, probes).
    pub seed: u64,
    /// Minibatch size of `step`.
    pub batch_size: usize,
    /// Examples in an objective set.
    pub objective_examples: usize,
    pub layout: L2oLayout,
    /// The meta-objective, in words (for people).
    pub meta_objective: String,
    /// When `reset` runs, in words (for people).
    pub reset: String,
    /// The regulariser's run-time side (`None`: none).
    pub regularizer: Option<RegularizerSchedule>,
    /// Imitation of Adam (`None`: off).
    pub imitation: Option<ImitationSpec>,
    /// How fresh optimizee parameters and optimizer state are drawn.
    pub init: L2oInit,
    /// Meta-testing on the training problem from the bundle's own graphs.
    pub metatest: Metatest,
}

/// One optimizer's compiled `train_step` on the bundle's training problem
/// (minibatch size `batch_size`), as `metac eval` runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetatestStep {
    /// The optimizer's label (`learned`, `adam-1e-3`, ...).
    pub label: String,
    /// The bundle graph.
    pub graph: String,
    pub io: TrainStepIo,
    /// How the optimizer state starts, in `io.state` order. For the learned
    /// optimizer the hidden states (`layout.hidden`) are then set from its
    /// weights by the bundle's `reset` graph.
    pub state: Vec<TensorInit>,
}

/// The graphs `metac eval` needs on the bundle's own problem: each
/// optimizer's step and the evaluation of final parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metatest {
    pub steps: Vec<MetatestStep>,
    /// The `evaluate` graph (evaluation chunks of `evaluate_io.batch_size`
    /// examples; none for data-free problems).
    pub evaluate: String,
    pub evaluate_io: EvalIo,
}

impl Metatest {
    /// The compiled step of optimizer `label`, if the bundle has one.
    pub fn step(&self, label: &str) -> Option<&MetatestStep> {
        self.steps.iter().find(|s| s.label == label)
    }
}

impl L2oMeta {
    /// The manifest's `meta` for this record: `{"l2o": ...}`.
    pub fn to_meta(&self) -> serde_json::Value {
        serde_json::json!({ "l2o": self })
    }

    /// Read and check `meta.l2o` of an L2O bundle's manifest.
    pub fn from_manifest(m: &Manifest) -> Result<Self> {
        ensure!(
            m.kind == KIND,
            "bundle kind is '{}', expected '{KIND}'",
            m.kind
        );
        let v = m
            .meta
            .get("l2o")
            .context("manifest meta has no 'l2o' (not an l2o bundle?)")?;
        let meta: L2oMeta =
            serde_json::from_value(v.clone()).context("malformed 'l2o' in manifest meta")?;
        meta.check()?;
        Ok(meta)
    }

    fn check(&self) -> Result<()> {
        if let Some(r) = &self.regularizer {
            ensure!(
                r.alpha.is_finite() && r.alpha >= 0.0,
                "'l2o.regularizer.alpha' in manifest meta must be >= 0, got {}",
                r.alpha
            );
        }
        if let Some(s) = &self.imitation {
            ensure!(
                (0.0..=1.0).contains(&s.mt_ratio),
                "'l2o.imitation.mt_ratio' in manifest meta must be in [0, 1], got {}",
                s.mt_ratio
            );
        }
        ensure!(
            self.batch_size > 0 && self.objective_examples > 0,
            "'l2o.batch_size' and 'l2o.objective_examples' in manifest meta must be at least 1"
        );
        for s in &self.metatest.steps {
            ensure!(
                s.state.iter().map(|i| &i.name).eq(s.io.state.iter()),
                "'l2o.metatest' step '{}' in manifest meta: its state rules do not name its state inputs",
                s.label
            );
            for i in &s.state {
                i.check()
                    .with_context(|| format!("'l2o.metatest' step '{}'", s.label))?;
            }
        }
        for (what, inits, names) in [
            ("theta", &self.init.theta, &self.layout.theta),
            ("state", &self.init.state, &self.layout.state),
        ] {
            let got: Vec<&String> = inits.iter().map(|i| &i.name).collect();
            ensure!(
                got.iter().copied().eq(names.iter()),
                "'l2o.init.{what}' in manifest meta names {got:?}, the layout {names:?}"
            );
            for i in inits {
                i.check()
                    .with_context(|| format!("'l2o.init.{what}' in manifest meta"))?;
            }
        }
        Ok(())
    }
}

/// See [`RunSettings::validation_split`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValidationSplit {
    #[default]
    Validation,
    Train,
}

impl ValidationSplit {
    fn is_default(&self) -> bool {
        *self == ValidationSplit::Validation
    }
}

/// Run-time settings of L2O meta-training: the `[run]` table of an L2O
/// config. They never change a compiled graph (a bundle's bytes do not
/// depend on them); `metac run` reads them from `--config` and its flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    pub num_meta_iterations: usize,
    pub unroll_length: usize,
    pub num_unrolls: usize,
    /// Validate every this many meta-iterations (0 = never).
    #[serde(default = "one")]
    pub evaluation_period: usize,
    /// Fresh problems per validation; the validation objective is their mean.
    #[serde(default = "one")]
    pub validation_problems: usize,
    /// Inner steps of a validation run (0: the meta-training horizon,
    /// `unroll_length * num_unrolls`). A longer one picks best checkpoints
    /// that stay stable beyond the horizon they were trained on.
    #[serde(default)]
    pub validation_steps: usize,
    /// Which MNIST split the validation problems draw their minibatches
    /// from: `validation` (5,000 examples, each seen about 25 times in a
    /// 1,000-step run of batch 128) or `train` (55,000, as the meta-test's
    /// 10,000-example test set, far less repetition; see docs/results.md).
    #[serde(default, skip_serializing_if = "ValidationSplit::is_default")]
    pub validation_split: ValidationSplit,
    /// Curriculum learning: inner steps per meta-iteration of each stage,
    /// replacing `num_unrolls`.
    #[serde(default)]
    pub curriculum: Option<Vec<usize>>,
    /// Curriculum: validations at a stage before it may switch.
    #[serde(default = "three")]
    pub min_num_eval: usize,
    /// BPTT keeps the state of every this-many-th step and recomputes the
    /// rest (0 or 1: keeps all).
    #[serde(default)]
    pub bptt_checkpoint_every: usize,
}

fn one() -> usize {
    1
}

fn three() -> usize {
    3
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            num_meta_iterations: 100,
            unroll_length: 20,
            num_unrolls: 5,
            evaluation_period: 1,
            validation_problems: 1,
            validation_steps: 0,
            validation_split: ValidationSplit::Validation,
            curriculum: None,
            min_num_eval: 3,
            bptt_checkpoint_every: 0,
        }
    }
}

fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("config key '{key}' must be at least 1, got 0");
    }
    Ok(())
}

impl RunSettings {
    /// The `[run]` table of the TOML config at `path` (defaults without
    /// one; the rest of the file is the compiler's and is not read here).
    pub fn from_config_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_config_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// [`RunSettings::from_config_file`] of the file's text.
    pub fn from_config_str(text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).context("invalid TOML")?;
        let s = match table.get("run") {
            None => RunSettings::default(),
            Some(v) => v
                .clone()
                .try_into()
                .context("invalid [run] table (config key 'run')")?,
        };
        s.validate()?;
        Ok(s)
    }

    /// Every value in range, with the offending key named.
    pub fn validate(&self) -> Result<()> {
        let r = self;
        positive("run.num_meta_iterations", r.num_meta_iterations)?;
        positive("run.unroll_length", r.unroll_length)?;
        positive("run.num_unrolls", r.num_unrolls)?;
        // evaluation_period 0 means never validate, which a curriculum cannot do without.
        if r.curriculum.is_some() && r.evaluation_period == 0 {
            bail!("config key 'run.evaluation_period' must be at least 1 with a run.curriculum (stages switch on validations)");
        }
        positive("run.min_num_eval", r.min_num_eval)?;
        positive("run.validation_problems", r.validation_problems)?;
        if let Some(c) = &r.curriculum {
            if c.is_empty() {
                bail!("config key 'run.curriculum' must list at least one stage");
            }
            if let Some(w) = c.windows(2).find(|w| w[1] <= w[0]) {
                bail!(
                    "config key 'run.curriculum' must be strictly increasing, got {} then {}",
                    w[0],
                    w[1]
                );
            }
            if let Some(&x) = c
                .iter()
                .find(|&&x| x == 0 || !x.is_multiple_of(r.unroll_length))
            {
                bail!(
                    "config key 'run.curriculum': {x} steps is not a positive multiple of run.unroll_length ({})",
                    r.unroll_length
                );
            }
        }
        Ok(())
    }

    /// The curriculum, if the settings have one.
    pub fn curriculum(&self) -> Option<Curriculum> {
        self.curriculum.clone().map(|steps| Curriculum {
            steps,
            min_num_eval: self.min_num_eval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_settings_come_from_the_run_table_only() {
        let s = RunSettings::from_config_str(
            "problem = \"mnist-mlp\"\n[optimizer]\nanything = 1\n[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\n",
        )
        .unwrap();
        assert_eq!(
            (s.num_meta_iterations, s.unroll_length, s.num_unrolls),
            (3, 5, 2)
        );
        assert_eq!(s.evaluation_period, 1);
        assert_eq!(
            RunSettings::from_config_str("").unwrap(),
            RunSettings::default()
        );
        let e = format!(
            "{:#}",
            RunSettings::from_config_str(
                "[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\nbogus = 1\n"
            )
            .unwrap_err()
        );
        assert!(e.contains("bogus"), "{e}");
        let e = format!(
            "{:#}",
            RunSettings::from_config_str("[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\ncurriculum = [10, 12]\n")
                .unwrap_err()
        );
        assert!(e.contains("run.curriculum"), "{e}");
    }
}
