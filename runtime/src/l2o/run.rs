//! `metac run` for L2O bundles: meta-training over many meta-iterations
//! with periodic validation, a best checkpoint, `metrics.jsonl`, and
//! atomic checkpoints from which a killed run resumes to the same result.
//!
//! Determinism: everything random in meta-iteration `i` (the optimizee's
//! initialisation, its minibatches, its objective sets) is drawn from seeds
//! derived from `(seed, i)` alone, and the checkpoint holds the complete
//! state carried between meta-iterations (meta-parameters and the
//! meta-optimizer's accumulators), so a resumed run computes exactly what
//! the uninterrupted run would have (same backend, same thread count).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::bptt::{Named, StepRunner};
use super::curriculum::{CurriculumState, Decision};
use super::data::{MnistUnrollData, SplitMix64};
use super::imitation::AdamTeacher;
use super::meta_opt::{CompiledMetaUpdate, MetaUpdate};
use super::regularizer::ProbeGenerator;
use super::train::{meta_iteration, Regularization, UnrollData, UnrollSchedule};
use super::{
    Curriculum, ImitationSpec, L2oInit, L2oLayout, L2oMeta, RegularizerSchedule, RunSettings,
    SessionRunner, MINIBATCH_LOSS, OBJECTIVE,
};
use crate::backend::{Backend, Session};
use crate::data::mnist::Split;
use crate::tensor::HostTensor;
use metac_contract::bundle::{read_safetensors, write_safetensors, Bundle, MANIFEST};
use metac_contract::fsutil::{sha256_hex, write_atomic};
use metac_contract::init::draw_all;

/// Fresh optimizee parameters (`layout.theta` order) and optimizer state
/// (`layout.state` order) drawn from `seed` by the bundle's rules
/// (`meta.l2o.init`).
fn sample(init: &L2oInit, seed: u64) -> (Named<HostTensor>, Named<HostTensor>) {
    let draw = |inits: &[metac_contract::init::TensorInit]| {
        draw_all(inits, seed)
            .into_iter()
            .map(|(n, t)| (n, HostTensor::from_graph(&t)))
            .collect()
    };
    (draw(&init.theta), draw(&init.state))
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IterationLog {
    pub iteration: usize,
    pub meta_losses: Vec<f64>,
    pub initial_objective: f64,
    pub final_objective: Option<f64>,
    pub final_minibatch_loss: Option<f64>,
    pub diverged: bool,
    pub seconds: f64,
    /// Objective on validation data after a validation run, when one ran.
    pub validation_objective: Option<f64>,
    pub best_validation: Option<f64>,
    /// Mean of the regulariser over the meta-iteration's steps (with one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reg: Option<f64>,
    /// Whether the meta-iteration imitated Adam, and its mean imitation MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imitation_mse: Option<f64>,
    /// Curriculum stage (0-based) and its inner steps per meta-iteration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<usize>,
    #[serde(default)]
    pub num_steps: usize,
}

/// What is carried between meta-iterations, plus bookkeeping.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointInfo {
    completed_iterations: usize,
    best_validation: Option<f64>,
    best_iteration: Option<usize>,
    manifest_sha256: String,
    weights_sha256: String,
    settings: RunSettings,
    #[serde(default)]
    curriculum: CurriculumState,
}

pub const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
pub const CHECKPOINT_INFO: &str = "checkpoint.json";
/// The best meta-parameters (and meta-optimizer moments) of the current
/// curriculum stage, restored when the stage advances.
pub const STAGE_BEST: &str = "stage-best.safetensors";
pub const BEST_WEIGHTS: &str = "best.safetensors";
pub const METRICS: &str = "metrics.jsonl";

/// Seed of meta-iteration `i` (and of validation, with a separate stream).
fn derive_seed(seed: u64, stream: u64, i: u64) -> u64 {
    let mut r = SplitMix64::new(
        seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    r.next_u64()
}

/// The objective graph's value at `theta` on an objective batch.
fn objective_value(
    s: &mut dyn Session,
    theta: &Named<HostTensor>,
    obj: &Named<HostTensor>,
) -> Result<f64> {
    let names = s.input_names();
    let ins: Vec<(&str, &HostTensor)> = theta
        .iter()
        .chain(obj.iter())
        .filter(|(n, _)| names.contains(n))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let out = s.run(&ins)?;
    let o = out
        .iter()
        .find(|(n, _)| n == OBJECTIVE)
        .context("objective graph has no 'objective' output")?;
    Ok(o.1.to_scalar_f32()? as f64)
}

/// A meta-training run in a directory.
pub struct MetaTrainer<'a> {
    pub bundle: &'a Bundle,
    /// The bundle's typed metadata (`meta.l2o`).
    pub meta: L2oMeta,
    pub layout: L2oLayout,
    /// The bundle's regulariser, if it has one.
    pub regularizer: Option<RegularizerSchedule>,
    /// The bundle's imitation settings and its compiled Adam step.
    imitation: Option<(ImitationSpec, Box<dyn Session>)>,
    pub settings: RunSettings,
    /// The settings' curriculum, if any.
    curriculum_spec: Option<Curriculum>,
    pub out: PathBuf,
    runner: SessionRunner,
    objective: Box<dyn Session>,
    phi: Named<HostTensor>,
    opt: CompiledMetaUpdate,
    completed: usize,
    best_validation: Option<f64>,
    best_iteration: Option<usize>,
    manifest_sha256: String,
    curriculum: CurriculumState,
}

impl<'a> MetaTrainer<'a> {
    /// Start a run in `out` (which must not hold a checkpoint unless
    /// `resume`), or resume the checkpoint there.
    pub fn open(
        bundle: &'a Bundle,
        backend: &dyn Backend,
        settings: RunSettings,
        out: &Path,
        resume: bool,
    ) -> Result<Self> {
        settings.validate()?;
        let meta = L2oMeta::from_manifest(&bundle.manifest)
            .with_context(|| format!("{}", bundle.dir.display()))?;
        ensure!(
            meta.data.is_some(),
            "{}: problem '{}' needs no data; meta-training runs on MNIST problems",
            bundle.dir.display(),
            meta.problem
        );
        let layout = meta.layout.clone();
        let regularizer = meta.regularizer.clone();
        let imitation = match meta.imitation.clone() {
            Some(spec) => {
                let s = backend.load(&bundle.graph_bytes(&spec.graph)?, &spec.graph)?;
                Some((spec, s))
            }
            None => None,
        };
        let manifest_sha256 = sha256_hex(&std::fs::read(bundle.dir.join(MANIFEST))?);
        let runner = SessionRunner::from_bundle(bundle, backend)?;
        let objective = backend.load(&bundle.graph_bytes("objective")?, "objective")?;
        let mut phi: Named<HostTensor> = Vec::new();
        for n in &layout.phi {
            let t = bundle.init.get(n).with_context(|| {
                format!(
                    "{}: no initial value for meta-parameter '{n}'",
                    bundle.dir.display()
                )
            })?;
            phi.push((n.clone(), HostTensor::from_graph(t)));
        }
        // The compiled meta-optimizer and its initial accumulators.
        let mut ms = vec![];
        for n in &layout.phi {
            let m = super::ms_name(n);
            let t = bundle
                .init
                .get(&m)
                .with_context(|| format!("{}: no initial value for '{m}'", bundle.dir.display()))?;
            ms.push(HostTensor::from_graph(t).into_f32()?);
        }
        let opt = CompiledMetaUpdate::new(
            backend.load(&bundle.graph_bytes(super::META_UPDATE)?, super::META_UPDATE)?,
            ms,
        );
        let mut t = MetaTrainer {
            bundle,
            meta,
            layout,
            regularizer,
            imitation,
            curriculum_spec: settings.curriculum(),
            settings,
            out: out.to_path_buf(),
            runner,
            objective,
            phi,
            opt,
            completed: 0,
            best_validation: None,
            best_iteration: None,
            manifest_sha256,
            curriculum: CurriculumState::default(),
        };
        let info = out.join(CHECKPOINT_INFO);
        if resume {
            ensure!(
                info.is_file(),
                "{}: no checkpoint to resume (run without --resume to start)",
                info.display()
            );
            t.load_checkpoint()?;
        } else {
            ensure!(
                !info.exists(),
                "{} already holds a run (checkpoint.json); pass --resume to continue it, or choose another --out",
                out.display()
            );
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join(METRICS), b"")?;
        }
        Ok(t)
    }

    pub fn completed(&self) -> usize {
        self.completed
    }

    /// Where the run is in its curriculum (default without one).
    pub fn curriculum_state(&self) -> &CurriculumState {
        &self.curriculum
    }

    /// Unrolls per meta-iteration: the curriculum stage's horizon, or the
    /// settings' `num_unrolls`.
    pub fn num_unrolls(&self) -> usize {
        match &self.curriculum_spec {
            Some(c) => self.curriculum.steps(c) / self.settings.unroll_length,
            None => self.settings.num_unrolls,
        }
    }

    pub fn phi(&self) -> &Named<HostTensor> {
        &self.phi
    }

    fn load_checkpoint(&mut self) -> Result<()> {
        let ip = self.out.join(CHECKPOINT_INFO);
        let info: CheckpointInfo = serde_json::from_str(&std::fs::read_to_string(&ip)?)
            .with_context(|| format!("{}: malformed checkpoint", ip.display()))?;
        ensure!(
            info.manifest_sha256 == self.manifest_sha256,
            "{}: the checkpoint belongs to a different bundle (manifest hash {} vs {}); resume with the bundle the run started with",
            ip.display(),
            &info.manifest_sha256[..12],
            &self.manifest_sha256[..12]
        );
        // The seed and batch size are the bundle's, checked by its hash.
        ensure!(
            info.settings.unroll_length == self.settings.unroll_length
                && info.settings.num_unrolls == self.settings.num_unrolls
                && info.settings.curriculum == self.settings.curriculum
                && info.settings.min_num_eval == self.settings.min_num_eval
                && info.settings.validation_problems == self.settings.validation_problems
                && info.settings.validation_steps == self.settings.validation_steps,
            "{}: the run was started with other settings ({:?}); resume with the same ones",
            ip.display(),
            info.settings
        );
        let wp = self.out.join(CHECKPOINT_WEIGHTS);
        let bytes = std::fs::read(&wp).with_context(|| format!("cannot read {}", wp.display()))?;
        ensure!(
            sha256_hex(&bytes) == info.weights_sha256,
            "{}: does not match checkpoint.json (corrupt checkpoint)",
            wp.display()
        );
        self.load_weights(&bytes, &wp)?;
        self.completed = info.completed_iterations;
        self.best_validation = info.best_validation;
        self.best_iteration = info.best_iteration;
        self.curriculum = info.curriculum;
        // Keep the metrics of the completed meta-iterations only.
        let mp = self.out.join(METRICS);
        let text = std::fs::read_to_string(&mp).unwrap_or_default();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<IterationLog>(l).is_ok_and(|r| r.iteration < self.completed)
            })
            .collect();
        write_atomic(
            &mp,
            (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes(),
        )?;
        Ok(())
    }

    /// Set `phi` and the meta-optimizer's moments from safetensors bytes of
    /// [`Self::weights_bytes`]`(true)` read from `path`.
    fn load_weights(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        let tensors = read_safetensors(bytes, &path.display().to_string())?;
        for (i, (name, t)) in self.phi.iter_mut().enumerate() {
            let v = tensors
                .get(&format!("phi/{name}"))
                .with_context(|| format!("{}: no 'phi/{name}'", path.display()))?;
            ensure!(
                v.shape == t.shape(),
                "{}: 'phi/{name}' has shape {:?}, the bundle {:?}",
                path.display(),
                v.shape,
                t.shape()
            );
            *t = HostTensor::from_graph(v);
            let m = tensors
                .get(&format!("ms/{name}"))
                .with_context(|| format!("{}: no 'ms/{name}'", path.display()))?;
            self.opt.accumulators()[i] = HostTensor::from_graph(m).into_f32()?;
        }
        Ok(())
    }

    fn weights_bytes(&self, with_ms: bool) -> Result<Vec<u8>> {
        let mut ts = vec![];
        for (i, (n, t)) in self.phi.iter().enumerate() {
            ts.push((format!("phi/{n}"), t.to_graph()));
            if with_ms {
                let m = &self.opt.ms[i];
                ts.push((
                    format!("ms/{n}"),
                    metac_graphs::Tensor::f32(m.shape(), m.iter().copied().collect()),
                ));
            }
        }
        write_safetensors(&ts)
    }

    fn save_checkpoint(&self) -> Result<()> {
        let bytes = self.weights_bytes(true)?;
        write_atomic(&self.out.join(CHECKPOINT_WEIGHTS), &bytes)?;
        let info = CheckpointInfo {
            completed_iterations: self.completed,
            best_validation: self.best_validation,
            best_iteration: self.best_iteration,
            manifest_sha256: self.manifest_sha256.clone(),
            weights_sha256: sha256_hex(&bytes),
            settings: self.settings.clone(),
            curriculum: self.curriculum.clone(),
        };
        // The info file is written last: it is what makes the checkpoint count.
        write_atomic(
            &self.out.join(CHECKPOINT_INFO),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )
    }

    /// Run the learned optimizer (no learning) on a fresh problem on
    /// `split` for the training horizon; the objective at the end.
    /// With `validation_problems` > 1, the mean over that many problems
    /// (each its own initialisation and batches; infinite if one diverges).
    pub fn validate(&mut self, split: &Split) -> Result<f64> {
        let n = self.settings.validation_problems.max(1);
        let mut sum = 0.0;
        for k in 0..n {
            sum += self.validate_one(split, derive_seed(self.meta.seed, 2, k as u64))?;
        }
        Ok(sum / n as f64)
    }

    /// One validation problem drawn from `seed`.
    fn validate_one(&mut self, split: &Split, seed: u64) -> Result<f64> {
        let s = &self.settings;
        let (mut theta, mut state) = sample(&self.meta.init, seed);
        let mut data = MnistUnrollData::new(
            split,
            self.meta.batch_size,
            self.meta.objective_examples,
            &self.layout.batch,
            &self.layout.objective_batch,
            &self.layout.objective_transposed,
            seed,
        )?;
        let phi_refs: Vec<(&str, &HostTensor)> =
            self.phi.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // Hidden states from the meta-parameters, as on a first unroll.
        let mut ins = phi_refs.clone();
        ins.extend(state.iter().map(|(n, t)| (n.as_str(), t)));
        for (n, t) in self.runner.reset(&ins)? {
            let name = n.trim_start_matches(super::NEXT);
            if let Some(e) = state.iter_mut().find(|(m, _)| m == name) {
                e.1 = t;
            }
        }
        let steps = match s.validation_steps {
            0 => s.unroll_length * self.num_unrolls(),
            n => n,
        };
        // Validation does not count a regulariser: where the bundle has the
        // step without it, that runs; otherwise the regularised step reads
        // probes, whose values do not affect the update.
        self.runner.set_regularized(false, false);
        let mut probes = ProbeGenerator::new(seed);
        for step in 0..steps {
            let mb = data.minibatch(step)?;
            let pr = match &self.regularizer {
                Some(r) if self.runner.unregularized.is_none() => probes.draw(r),
                _ => vec![],
            };
            let mut ins = phi_refs.clone();
            ins.extend(
                theta
                    .iter()
                    .chain(state.iter())
                    .chain(mb.iter())
                    .chain(pr.iter())
                    .map(|(n, t)| (n.as_str(), t)),
            );
            // Outputs are moved into the next step's inputs, not copied.
            let mut out: HashMap<String, HostTensor> =
                self.runner.step(&ins)?.into_iter().collect();
            for e in theta.iter_mut().chain(state.iter_mut()) {
                e.1 = out
                    .remove(&super::next_name(&e.0))
                    .with_context(|| format!("step graph has no output for '{}'", e.0))?;
            }
            let finite = out
                .get(MINIBATCH_LOSS)
                .is_none_or(|t| t.to_scalar_f32().is_ok_and(f32::is_finite));
            if !finite {
                return Ok(f64::INFINITY);
            }
        }
        let obj = data.objective_batch(1)?;
        objective_value(self.objective.as_mut(), &theta, &obj)
    }

    /// Run meta-iterations until `settings.num_meta_iterations` are done.
    /// `on_iteration` sees every log line (progress display).
    pub fn run(
        &mut self,
        train: &Split,
        validation: &Split,
        on_iteration: &mut dyn FnMut(&IterationLog),
    ) -> Result<()> {
        let s = self.settings.clone();
        while self.completed < s.num_meta_iterations && !self.curriculum.stopped {
            let schedule = UnrollSchedule {
                unroll_length: s.unroll_length,
                num_unrolls: self.num_unrolls(),
                checkpoint_every: s.bptt_checkpoint_every,
            };
            let stage = s.curriculum.as_ref().map(|_| self.curriculum.stage);
            let it = self.completed;
            let t0 = Instant::now();
            let seed = derive_seed(self.meta.seed, 1, it as u64);
            let (theta0, state0) = sample(&self.meta.init, seed);
            let mut data = MnistUnrollData::new(
                train,
                self.meta.batch_size,
                self.meta.objective_examples,
                &self.layout.batch,
                &self.layout.objective_batch,
                &self.layout.objective_transposed,
                seed,
            )?;
            // The log meta-objective's constant: the objective at the start,
            // on the first unroll's objective set.
            let first = data.objective_batch(0)?;
            let initial_objective = objective_value(self.objective.as_mut(), &theta0, &first)?;
            if !initial_objective.is_finite() {
                bail!("meta-iteration {it}: the initial objective is not finite ({initial_objective})");
            }
            data.set_first_objective(first);
            let mut probes = ProbeGenerator::new(derive_seed(self.meta.seed, 3, it as u64));
            let reg = self.regularizer.as_ref().map(|schedule| Regularization {
                schedule,
                probes: &mut probes,
            });
            // Imitate Adam in a share mt_ratio of the meta-iterations.
            let mut teacher = match self.imitation.as_mut() {
                Some((spec, session)) => {
                    let mut r = SplitMix64::new(derive_seed(self.meta.seed, 4, it as u64));
                    let u = (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    (u < spec.mt_ratio).then(|| AdamTeacher::new(spec, session.as_mut(), &theta0))
                }
                None => None,
            };
            let rep = meta_iteration(
                &mut self.runner,
                &self.layout,
                &mut self.phi,
                &mut self.opt,
                theta0,
                state0,
                initial_objective,
                schedule,
                &mut data,
                reg,
                teacher.as_mut(),
            )?;
            self.completed += 1;
            let mut validation_objective = None;
            if s.evaluation_period > 0 && self.completed.is_multiple_of(s.evaluation_period) {
                let v = self.validate(validation)?;
                validation_objective = Some(v);
                let improved = v.is_finite() && self.best_validation.is_none_or(|b| v < b);
                if improved {
                    self.best_validation = Some(v);
                    self.best_iteration = Some(it);
                    write_atomic(&self.out.join(BEST_WEIGHTS), &self.weights_bytes(false)?)?;
                }
                if let Some(c) = &self.curriculum_spec {
                    if improved {
                        write_atomic(&self.out.join(STAGE_BEST), &self.weights_bytes(true)?)?;
                    }
                    if self.curriculum.after_validation(c, improved) == Decision::Advance {
                        let p = self.out.join(STAGE_BEST);
                        let bytes = std::fs::read(&p)
                            .with_context(|| format!("cannot read {}", p.display()))?;
                        self.load_weights(&bytes, &p)?;
                    }
                }
            }
            let log = IterationLog {
                iteration: it,
                meta_losses: rep.meta_losses.clone(),
                initial_objective,
                final_objective: rep.objectives.last().copied(),
                final_minibatch_loss: rep.minibatch_losses.last().copied(),
                diverged: rep.diverged,
                seconds: t0.elapsed().as_secs_f64(),
                validation_objective,
                best_validation: self.best_validation,
                mean_reg: (!rep.regs.is_empty())
                    .then(|| rep.regs.iter().sum::<f64>() / rep.regs.len() as f64),
                imitation_mse: (!rep.imitation_mse.is_empty()).then(|| {
                    rep.imitation_mse.iter().sum::<f64>() / rep.imitation_mse.len() as f64
                }),
                stage,
                num_steps: schedule.unroll_length * schedule.num_unrolls,
            };
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(self.out.join(METRICS))?;
            writeln!(f, "{}", serde_json::to_string(&log)?)?;
            f.sync_all()?;
            self.save_checkpoint()?;
            on_iteration(&log);
        }
        Ok(())
    }
}

/// Read the meta-parameters of a run (`best.safetensors` or the last
/// checkpoint), named as in the bundle.
pub fn load_run_phi(run: &Path, best: bool) -> Result<Named<metac_graphs::Tensor>> {
    let p = run.join(if best && run.join(BEST_WEIGHTS).is_file() {
        BEST_WEIGHTS
    } else {
        CHECKPOINT_WEIGHTS
    });
    let bytes = std::fs::read(&p).with_context(|| {
        format!(
            "cannot read {} (is {} a metac run directory?)",
            p.display(),
            run.display()
        )
    })?;
    Ok(read_safetensors(&bytes, &p.display().to_string())?
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("phi/").map(|n| (n.to_string(), t)))
        .collect())
}
