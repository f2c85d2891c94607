//! The L2O compile configuration, read from TOML.
//!
//! Everything outside the `[run]` table shapes the compiled bundle (and is
//! written into the manifest's `meta`); `[run]` holds run-time settings
//! (number of meta-iterations, unroll length, ...) that the runtime reads
//! from the same file and that never change a compiled graph: the bundle's
//! bytes do not depend on them.
//!
//! ```toml
//! problem = "mnist-mlp"
//! batch_size = 128
//! objective_examples = 10000
//! objective_chunk = 10            # objectives evaluated together (see below)
//! use_second_derivatives = false
//! seed = 0
//!
//! [optimizer]
//! level2_input = "last-tensor"   # or "mean-over-tensors"
//!
//! [meta_optimizer]               # RMSProp
//! lr = 1e-6
//! decay = 0.9
//! eps = 1e-20
//! clip = 1e4
//! accumulator_init = 1.0         # TF1's RMSProp starts the accumulator at 1
//!
//! [regularizer]                 # L2O-Entropy; omitted: none
//! reg_option = "hessian"         # none, hessian, hessian-ev, hessian-esd, jacob
//! alpha = 1e-4
//! regularize_time = "all"        # all, posterior or none (required with a reg_option)
//! num_probes = 10                # hessian: Rademacher probes per step
//!
//! [imitation]                   # imitation of Adam; omitted: off
//! mt_ratio = 0.1                 # probability per meta-iteration
//! lr = 0.01                      # Adam's learning rate
//! mt_k = 1                       # Adam steps per label
//! weight = 1.0                   # weight of the MSE in the meta-loss
//!
//! [run]
//! num_meta_iterations = 100
//! unroll_length = 20
//! num_unrolls = 5
//! evaluation_period = 1
//! validation_steps = 1000        # inner steps of a validation run (0: the horizon)
//! validation_problems = 3        # fresh problems per validation
//! validation_split = "train"     # MNIST split of their minibatches (default "validation")
//! ```
//!
//! Unknown keys are errors, and every value is validated when the file is
//! read, with the offending key named.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use metac_contract::l2o::RunSettings;
use metac_contract::l2o::{RegularizeTime, RmsPropConfig};

use super::regularizer::{RegOption, RegularizerSpec};
use crate::models::hrnn::{HrnnConfig, Level2Input};
use crate::models::problems::problem_by_name;

/// What the global RNN reads (see [`Level2Input`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Level2InputName {
    /// The original code's quirk: the last tensor's level-1 state.
    #[default]
    LastTensor,
    /// The mean over tensors.
    MeanOverTensors,
}

/// The subset of the HierarchicalRNN config exposed in the TOML; the rest
/// are the `metarun.py` defaults of [`HrnnConfig::default`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default)]
    pub level2_input: Level2InputName,
}

impl OptimizerConfig {
    pub fn hrnn_config(&self) -> HrnnConfig {
        HrnnConfig {
            level2_input: match self.level2_input {
                Level2InputName::LastTensor => Level2Input::LastTensor,
                Level2InputName::MeanOverTensors => Level2Input::MeanOverTensors,
            },
            ..HrnnConfig::default()
        }
    }
}

/// RMSProp on the meta-parameters; gradients are made finite and clipped
/// elementwise to `[-clip, clip]` first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaOptimizerConfig {
    #[serde(default = "default_meta_lr")]
    pub lr: f64,
    #[serde(default = "default_decay")]
    pub decay: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Start value of the mean-square accumulator (TF1's RMSProp: 1).
    #[serde(default = "default_accumulator_init")]
    pub accumulator_init: f64,
}

fn default_accumulator_init() -> f64 {
    1.0
}

impl MetaOptimizerConfig {
    /// The runtime's RMSProp settings.
    pub fn rmsprop(&self) -> RmsPropConfig {
        RmsPropConfig {
            lr: self.lr,
            decay: self.decay,
            eps: self.eps,
            clip: self.clip,
            accumulator_init: self.accumulator_init,
        }
    }
}

fn default_meta_lr() -> f64 {
    1e-6
}
fn default_decay() -> f64 {
    0.9
}
fn default_eps() -> f64 {
    1e-20
}
fn default_clip() -> f64 {
    1e4
}

impl Default for MetaOptimizerConfig {
    fn default() -> Self {
        MetaOptimizerConfig {
            lr: default_meta_lr(),
            decay: default_decay(),
            eps: default_eps(),
            clip: default_clip(),
            accumulator_init: default_accumulator_init(),
        }
    }
}

/// The Hessian regulariser of the L2O-Entropy fork. `reg_option`,
/// `num_probes`, `power_iterations` and `lanczos_steps` shape the graphs;
/// `alpha`, `regularize_time` and `posterior_scale` are read by the runtime
/// from the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegularizerConfig {
    #[serde(default)]
    pub reg_option: RegOption,
    /// Weight of the regulariser in the meta-loss (`regular += alpha * reg`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Which unrolls are regularised; required with a `reg_option` (the
    /// fork's commands pass `none`, which silently disables the regulariser).
    #[serde(default)]
    pub regularize_time: Option<RegularizeTime>,
    /// `posterior`: regularise unrolls with index > int(scale * n + 1).
    #[serde(default = "default_posterior_scale")]
    pub posterior_scale: f64,
    /// `hessian`: Rademacher probes per step.
    #[serde(default = "default_ten")]
    pub num_probes: usize,
    /// `hessian-ev`: power-iteration steps.
    #[serde(default = "default_ten")]
    pub power_iterations: usize,
    /// `hessian-esd`: Lanczos steps.
    #[serde(default = "default_ten")]
    pub lanczos_steps: usize,
}

fn default_alpha() -> f64 {
    1e-4
}
fn default_posterior_scale() -> f64 {
    0.5
}
fn default_ten() -> usize {
    10
}

impl Default for RegularizerConfig {
    fn default() -> Self {
        RegularizerConfig {
            reg_option: RegOption::None,
            alpha: default_alpha(),
            regularize_time: None,
            posterior_scale: default_posterior_scale(),
            num_probes: default_ten(),
            power_iterations: default_ten(),
            lanczos_steps: default_ten(),
        }
    }
}

impl RegularizerConfig {
    /// What the graphs need.
    pub fn spec(&self) -> RegularizerSpec {
        RegularizerSpec {
            option: self.reg_option,
            num_probes: self.num_probes,
            power_iterations: self.power_iterations,
            lanczos_steps: self.lanczos_steps,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            bail!(
                "config key 'regularizer.alpha' must be a finite number >= 0, got {}",
                self.alpha
            );
        }
        if !(0.0..=1.0).contains(&self.posterior_scale) {
            bail!(
                "config key 'regularizer.posterior_scale' must be in [0, 1], got {}",
                self.posterior_scale
            );
        }
        positive("regularizer.num_probes", self.num_probes)?;
        positive("regularizer.power_iterations", self.power_iterations)?;
        positive("regularizer.lanczos_steps", self.lanczos_steps)?;
        if self.reg_option != RegOption::None && self.regularize_time.is_none() {
            bail!(
                "config key 'regularizer.regularize_time' must be given with a reg_option: \
                 all, posterior or none"
            );
        }
        Ok(())
    }
}

/// Imitation of Adam (seed section 5.2): with probability `mt_ratio` per
/// meta-iteration the compiled Adam step labels every inner step with its
/// update, and the MSE enters the meta-loss. `mt_ratio = 0` (the default)
/// compiles no Adam step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImitationConfig {
    #[serde(default)]
    pub mt_ratio: f64,
    #[serde(default = "default_mt_lr")]
    pub lr: f64,
    #[serde(default = "default_mt_k")]
    pub mt_k: usize,
    #[serde(default = "default_mt_weight")]
    pub weight: f64,
}

fn default_mt_lr() -> f64 {
    0.01
}
fn default_mt_k() -> usize {
    1
}
fn default_mt_weight() -> f64 {
    1.0
}

impl Default for ImitationConfig {
    fn default() -> Self {
        ImitationConfig {
            mt_ratio: 0.0,
            lr: default_mt_lr(),
            mt_k: default_mt_k(),
            weight: default_mt_weight(),
        }
    }
}

impl ImitationConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.mt_ratio) {
            bail!(
                "config key 'imitation.mt_ratio' must be in [0, 1], got {}",
                self.mt_ratio
            );
        }
        finite_positive("imitation.lr", self.lr)?;
        positive("imitation.mt_k", self.mt_k)?;
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            bail!(
                "config key 'imitation.weight' must be a finite number >= 0, got {}",
                self.weight
            );
        }
        Ok(())
    }
}

/// Run-time settings: read by the runtime, never part of a compiled graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2oConfig {
    /// A name known to [`problem_by_name`].
    pub problem: String,
    /// Minibatch size of the inner steps.
    pub batch_size: usize,
    /// Size of the large objective set the meta-loss is measured on (ignored
    /// by data-free problems).
    pub objective_examples: usize,
    /// The objective (value and gradient over the objective set) is measured
    /// for this many inner steps in one graph run: their products with the
    /// objective set become one wide product that reads the set once
    /// (`objective_chunk` graph). A compile-time setting; any unroll length
    /// works (a last, shorter chunk is padded).
    #[serde(default = "default_objective_chunk")]
    pub objective_chunk: usize,
    /// Differentiate through the optimizee gradient (second derivatives);
    /// when false the gradient fed to the optimizer is a stop-gradient.
    pub use_second_derivatives: bool,
    /// Seed of the meta-parameter and state initialisation.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub meta_optimizer: MetaOptimizerConfig,
    #[serde(default)]
    pub regularizer: RegularizerConfig,
    #[serde(default)]
    pub imitation: ImitationConfig,
    #[serde(default)]
    /// The `[run]` table: run-time settings (see [`RunSettings`]).
    pub run: RunSettings,
}

fn default_objective_chunk() -> usize {
    10
}

fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("config key '{key}' must be at least 1, got 0");
    }
    Ok(())
}

fn finite_positive(key: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("config key '{key}' must be a finite number > 0, got {v}");
    }
    Ok(())
}

impl L2oConfig {
    /// Parse and validate TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: L2oConfig = toml::from_str(text).context("invalid l2o config")?;
        c.validate()?;
        Ok(c)
    }

    /// Read, parse and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading l2o config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Check every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        positive("batch_size", self.batch_size)?;
        positive("objective_examples", self.objective_examples)?;
        positive("objective_chunk", self.objective_chunk)?;
        if let Err(e) = problem_by_name(&self.problem, self.batch_size) {
            bail!("config key 'problem': {e}");
        }
        let m = &self.meta_optimizer;
        finite_positive("meta_optimizer.lr", m.lr)?;
        if !(0.0..1.0).contains(&m.decay) {
            bail!(
                "config key 'meta_optimizer.decay' must be in [0, 1), got {}",
                m.decay
            );
        }
        if !(m.eps.is_finite() && m.eps >= 0.0) {
            bail!(
                "config key 'meta_optimizer.eps' must be a finite number >= 0, got {}",
                m.eps
            );
        }
        finite_positive("meta_optimizer.clip", m.clip)?;
        if !(m.accumulator_init.is_finite() && m.accumulator_init >= 0.0) {
            bail!(
                "config key 'meta_optimizer.accumulator_init' must be a finite number >= 0, got {}",
                m.accumulator_init
            );
        }
        self.regularizer.validate()?;
        self.imitation.validate()?;
        self.run.validate()
    }

    /// The part of the config that shapes the bundle, as JSON for the
    /// manifest's `meta` (everything but `[run]`).
    pub fn compile_meta(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Some(o) = v.as_object_mut() {
            o.remove("run");
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "problem = \"quadratic\"\nbatch_size = 4\nobjective_examples = 8\nuse_second_derivatives = true\n";

    #[test]
    fn parses_defaults_and_tables() {
        let c = L2oConfig::from_toml_str(BASE).unwrap();
        assert_eq!(c.run, RunSettings::default());
        assert_eq!(c.meta_optimizer, MetaOptimizerConfig::default());
        let c = L2oConfig::from_toml_str(&format!(
            "{BASE}[optimizer]\nlevel2_input = \"mean-over-tensors\"\n[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\n"
        ))
        .unwrap();
        assert_eq!(
            c.optimizer.hrnn_config().level2_input,
            Level2Input::MeanOverTensors
        );
        assert_eq!(c.run.unroll_length, 5);
        assert_eq!(c.run.validation_steps, 0);
        let c = L2oConfig::from_toml_str(&format!(
            "{BASE}[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\nvalidation_steps = 1000\nobjective_chunk = 1\n"
        ));
        // objective_chunk is a compile-time key: not in [run].
        assert!(c.is_err());
        let c = L2oConfig::from_toml_str(&format!(
            "objective_chunk = 4\n{BASE}[run]\nnum_meta_iterations = 3\nunroll_length = 5\nnum_unrolls = 2\nvalidation_steps = 1000\n"
        ))
        .unwrap();
        assert_eq!((c.run.validation_steps, c.objective_chunk), (1000, 4));
        assert_eq!(L2oConfig::from_toml_str(BASE).unwrap().objective_chunk, 10);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |extra: &str| {
            format!(
                "{:#}",
                L2oConfig::from_toml_str(&format!("{BASE}{extra}")).unwrap_err()
            )
        };
        let e = err("[run]\nnum_meta_iterations = 3\nunroll_length = 0\nnum_unrolls = 2\n");
        assert!(e.contains("run.unroll_length"), "{e}");
        let e = err("bogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("[meta_optimizer]\nlr = -1.0\n");
        assert!(e.contains("meta_optimizer.lr"), "{e}");
        let e = err("[optimizer]\nlevel2_input = \"first\"\n");
        assert!(e.contains("level2_input") || e.contains("first"), "{e}");
        let e = format!(
            "{:#}",
            L2oConfig::from_toml_str(&BASE.replace("quadratic", "nope")).unwrap_err()
        );
        assert!(e.contains("'problem'"), "{e}");
        let e = format!(
            "{:#}",
            L2oConfig::from_toml_str(&BASE.replace("batch_size = 4", "batch_size = 0"))
                .unwrap_err()
        );
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn regularizer_keys_are_checked() {
        let err = |extra: &str| {
            format!(
                "{:#}",
                L2oConfig::from_toml_str(&format!("{BASE}[regularizer]\n{extra}")).unwrap_err()
            )
        };
        let e = err("reg_option = \"hessian-trace\"\nregularize_time = \"all\"\n");
        assert!(e.contains("reg_option"), "{e}");
        let e = err("reg_option = \"hessian\"\nregularize_time = \"all\"\nalpha = -1e-4\n");
        assert!(e.contains("regularizer.alpha"), "{e}");
        let e = err("reg_option = \"hessian\"\n");
        assert!(e.contains("regularizer.regularize_time"), "{e}");
        let e = err("reg_option = \"jacob\"\nregularize_time = \"later\"\n");
        assert!(e.contains("regularize_time"), "{e}");
        let e = err("reg_option = \"hessian\"\nregularize_time = \"all\"\nnum_probes = 0\n");
        assert!(e.contains("regularizer.num_probes"), "{e}");
        let c = L2oConfig::from_toml_str(&format!(
            "{BASE}[regularizer]\nreg_option = \"hessian-esd\"\nregularize_time = \"posterior\"\n"
        ))
        .unwrap();
        assert_eq!(c.regularizer.spec().option, RegOption::HessianEsd);
        assert_eq!(
            c.regularizer.regularize_time,
            Some(RegularizeTime::Posterior)
        );
    }

    #[test]
    fn imitation_is_checked() {
        let err = |extra: &str| {
            format!(
                "{:#}",
                L2oConfig::from_toml_str(&format!("{BASE}[imitation]\n{extra}")).unwrap_err()
            )
        };
        assert!(err("mt_ratio = 1.5\n").contains("imitation.mt_ratio"));
        assert!(err("mt_ratio = -0.1\n").contains("imitation.mt_ratio"));
        assert!(err("mt_ratio = 0.1\nmt_k = 0\n").contains("imitation.mt_k"));
        assert!(err("mt_ratio = 0.1\nlr = 0\n").contains("imitation.lr"));
        let c = L2oConfig::from_toml_str(&format!("{BASE}[imitation]\nmt_ratio = 0.1\n")).unwrap();
        assert_eq!(c.imitation.mt_k, 1);
    }

    #[test]
    fn curriculum_is_checked() {
        let run = |c: &str| {
            L2oConfig::from_toml_str(&format!(
                "{BASE}[run]\nnum_meta_iterations = 3\nunroll_length = 20\nnum_unrolls = 5\ncurriculum = {c}\n"
            ))
        };
        assert_eq!(
            run("[100, 200, 500]").unwrap().run.curriculum,
            Some(vec![100, 200, 500])
        );
        for (bad, want) in [
            ("[100, 100]", "strictly increasing"),
            ("[200, 100]", "strictly increasing"),
            ("[100, 210]", "multiple"),
            ("[]", "at least one"),
        ] {
            let e = format!("{:#}", run(bad).unwrap_err());
            assert!(
                e.contains("run.curriculum") && e.contains(want),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn validation_split_is_read_and_checked() {
        use metac_contract::l2o::ValidationSplit;
        let run = |extra: &str| {
            L2oConfig::from_toml_str(&format!(
                "{BASE}[run]\nnum_meta_iterations = 3\nunroll_length = 20\nnum_unrolls = 5\n{extra}"
            ))
        };
        assert_eq!(
            run("").unwrap().run.validation_split,
            ValidationSplit::Validation
        );
        assert_eq!(
            run("validation_split = \"train\"\n")
                .unwrap()
                .run
                .validation_split,
            ValidationSplit::Train
        );
        let e = format!("{:#}", run("validation_split = \"test\"\n").unwrap_err());
        assert!(e.contains("validation_split") || e.contains("test"), "{e}");
    }

    #[test]
    fn run_table_is_not_compile_meta() {
        let a = L2oConfig::from_toml_str(BASE).unwrap();
        let mut b = a.clone();
        b.run.unroll_length = 7;
        assert_eq!(a.compile_meta(), b.compile_meta());
        assert!(a.compile_meta().get("run").is_none());
    }
}
