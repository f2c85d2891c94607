//! `metac run` for L2O bundles: meta-training as a workload
//! ([`L2oWorkload`]) of the generic driver ([`crate::trainer`]), which owns
//! `metrics.jsonl`, validation and the best checkpoint, atomic checkpoints
//! and resume. A meta-iteration is [`meta_iteration`] on a fresh problem;
//! validation runs the frozen learned optimizer on a fresh problem of the
//! validation split; the curriculum (if any) switches stages after
//! validations.
//!
//! Determinism: everything random in meta-iteration `i` (the optimizee's
//! initialisation, its minibatches, its objective sets) is drawn from seeds
//! derived from `(seed, i)` alone, and the checkpoint holds the complete
//! state carried between meta-iterations (meta-parameters and the
//! meta-optimizer's accumulators), so a resumed run computes exactly what
//! the uninterrupted run would have (same backend, same thread count).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::bptt::{Named, Role, StepRunner};
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
use crate::metatest::DIVERGENCE_FACTOR;
use crate::tensor::HostTensor;
use crate::trainer::{MetricsLine, Validation, Workload, BEST_WEIGHTS, CHECKPOINT_WEIGHTS};
use metac_contract::bundle::{read_safetensors, write_safetensors, Bundle};
use metac_contract::fsutil::write_atomic;
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

/// The L2O part of a `metrics.jsonl` line (the driver adds `iteration`,
/// `seconds`, `validation_objective` and `best_validation`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IterationLog {
    pub meta_losses: Vec<f64>,
    pub initial_objective: f64,
    pub final_objective: Option<f64>,
    pub final_minibatch_loss: Option<f64>,
    pub diverged: bool,
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

/// The best meta-parameters (and meta-optimizer moments) of the current
/// curriculum stage, restored when the stage advances.
pub const STAGE_BEST: &str = "stage-best.safetensors";

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

/// L2O meta-training as a workload of the generic driver: the learned
/// optimizer's weights `phi` and the meta-optimizer's moments are the
/// state, a meta-iteration is the training iteration.
pub struct L2oWorkload<'a> {
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
    train: &'a Split,
    validation: &'a Split,
    runner: SessionRunner,
    objective: Box<dyn Session>,
    phi: Named<HostTensor>,
    opt: CompiledMetaUpdate,
    curriculum: CurriculumState,
    /// The bundle's manifest hash: what a checkpoint must belong to.
    pub manifest_sha256: String,
}

impl<'a> L2oWorkload<'a> {
    /// The meta-training of `bundle` with `settings`, on minibatches and
    /// objective sets of `train` and validations on `validation`.
    pub fn new(
        bundle: &'a Bundle,
        backend: &dyn Backend,
        settings: RunSettings,
        train: &'a Split,
        validation: &'a Split,
    ) -> Result<Self> {
        settings.validate()?;
        let meta = L2oMeta::from_manifest(&bundle.manifest)
            .with_context(|| format!("{}", bundle.dir.display()))?;
        ensure!(
            meta.data == Some(super::DataKind::Mnist),
            "{}: problem '{}' is not an MNIST problem; meta-training runs on MNIST problems",
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
        let manifest_sha256 = bundle.manifest_sha256()?;
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
        Ok(L2oWorkload {
            bundle,
            meta,
            layout,
            regularizer,
            imitation,
            curriculum_spec: settings.curriculum(),
            settings,
            train,
            validation,
            runner,
            objective,
            phi,
            opt,
            curriculum: CurriculumState::default(),
            manifest_sha256,
        })
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

    /// The minibatches and objective sets of a problem drawn from `seed`
    /// on `split`, at the bundle's sizes.
    fn problem_data(&self, split: &'a Split, seed: u64) -> Result<MnistUnrollData<'a>> {
        MnistUnrollData::new(
            split,
            self.meta.batch_size,
            self.meta.objective_examples,
            &self.layout.batch,
            &self.layout.objective_batch,
            &self.layout.objective_transposed,
            seed,
        )
    }

    /// One validation problem drawn from `seed`: the learned optimizer
    /// (no learning) on a fresh problem of the validation split for the
    /// validation horizon; the objective at the end (infinite if the
    /// minibatch loss diverges).
    fn validate_one(&mut self, seed: u64) -> Result<f64> {
        let s = &self.settings;
        let (mut theta, mut state) = sample(&self.meta.init, seed);
        let mut data = self.problem_data(self.validation, seed)?;
        let phi_refs: Vec<(&str, &HostTensor)> =
            self.phi.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // Hidden states from the meta-parameters, as on a first unroll.
        let mut ins = phi_refs.clone();
        ins.extend(state.iter().map(|(n, t)| (n.as_str(), t)));
        for (n, t) in self.runner.run(Role::Reset, &ins)? {
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
        let mut first: Option<f32> = None;
        for step in 0..steps {
            let mb = data.minibatch(step)?;
            let pr = match &self.regularizer {
                Some(r) if !self.runner.has_unregularized() => probes.draw(r),
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
                self.runner.run(Role::Step, &ins)?.into_iter().collect();
            for e in theta.iter_mut().chain(state.iter_mut()) {
                e.1 = out
                    .remove(&super::next_name(&e.0))
                    .with_context(|| format!("step graph has no output for '{}'", e.0))?;
            }
            // A run whose minibatch loss is non-finite or above
            // DIVERGENCE_FACTOR times its first step's has diverged (as
            // `metac eval` counts it): the worst objective, so that no
            // optimizer that diverges within the validation horizon is
            // selected.
            if let Some(t) = out.get(MINIBATCH_LOSS) {
                let l = t.to_scalar_f32().unwrap_or(f32::NAN);
                let l0 = *first.get_or_insert(l);
                if !l.is_finite() || (l0 > 0.0 && l > DIVERGENCE_FACTOR * l0) {
                    return Ok(f64::INFINITY);
                }
            }
        }
        let obj = data.objective_batch(1)?;
        objective_value(self.objective.as_mut(), &theta, &obj)
    }
}

impl Workload for L2oWorkload<'_> {
    type Record = IterationLog;
    type Extra = CurriculumState;

    fn iteration(&mut self, it: usize) -> Result<IterationLog> {
        let s = self.settings.clone();
        let schedule = UnrollSchedule {
            unroll_length: s.unroll_length,
            num_unrolls: self.num_unrolls(),
            checkpoint_every: s.bptt_checkpoint_every,
        };
        let stage = s.curriculum.as_ref().map(|_| self.curriculum.stage);
        let seed = derive_seed(self.meta.seed, 1, it as u64);
        let (theta0, state0) = sample(&self.meta.init, seed);
        let mut data = self.problem_data(self.train, seed)?;
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
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        Ok(IterationLog {
            meta_losses: rep.meta_losses.clone(),
            initial_objective,
            final_objective: rep.objectives.last().copied(),
            final_minibatch_loss: rep.minibatch_losses.last().copied(),
            diverged: rep.diverged,
            mean_reg: mean(&rep.regs),
            imitation_mse: mean(&rep.imitation_mse),
            stage,
            num_steps: schedule.unroll_length * schedule.num_unrolls,
        })
    }

    /// With `validation_problems` > 1, the mean over that many problems
    /// (each its own initialisation and batches; infinite if one diverges).
    fn validate(&mut self) -> Result<Validation> {
        let n = self.settings.validation_problems.max(1);
        let mut sum = 0.0;
        for k in 0..n {
            sum += self.validate_one(derive_seed(self.meta.seed, 2, k as u64))?;
        }
        Ok((sum / n as f64).into())
    }

    fn after_validation(&mut self, improved: bool, dir: &Path) -> Result<()> {
        let Some(c) = self.curriculum_spec.clone() else {
            return Ok(());
        };
        if improved {
            write_atomic(
                &dir.join(STAGE_BEST),
                &write_safetensors(&self.weights(true)?)?,
            )?;
        }
        if self.curriculum.after_validation(&c, improved) == Decision::Advance {
            let p = dir.join(STAGE_BEST);
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let what = p.display().to_string();
            self.load_weights(&read_safetensors(&bytes, &what)?, &what)?;
        }
        Ok(())
    }

    fn finished(&self) -> bool {
        self.curriculum.stopped
    }

    fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, metac_graphs::Tensor)>> {
        let mut ts = vec![];
        for (i, (n, t)) in self.phi.iter().enumerate() {
            ts.push((format!("phi/{n}"), t.to_graph()));
            if with_optimizer {
                let m = &self.opt.ms[i];
                ts.push((
                    format!("ms/{n}"),
                    metac_graphs::Tensor::f32(m.shape(), m.iter().copied().collect()),
                ));
            }
        }
        Ok(ts)
    }

    fn load_weights(
        &mut self,
        tensors: &BTreeMap<String, metac_graphs::Tensor>,
        what: &str,
    ) -> Result<()> {
        for (i, (name, t)) in self.phi.iter_mut().enumerate() {
            let v = tensors
                .get(&format!("phi/{name}"))
                .with_context(|| format!("{what}: no 'phi/{name}'"))?;
            ensure!(
                v.shape == t.shape(),
                "{what}: 'phi/{name}' has shape {:?}, the bundle {:?}",
                v.shape,
                t.shape()
            );
            *t = HostTensor::from_graph(v);
            let m = tensors
                .get(&format!("ms/{name}"))
                .with_context(|| format!("{what}: no 'ms/{name}'"))?;
            self.opt.accumulators()[i] = HostTensor::from_graph(m).into_f32()?;
        }
        Ok(())
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    /// The settings that shape a meta-iteration must match; the number of
    /// meta-iterations, the validation period and the BPTT checkpointing
    /// may change. (The seed and batch size are the bundle's, checked by
    /// its hash.)
    fn check_resume(&self, saved: &serde_json::Value) -> Result<()> {
        let saved: RunSettings =
            serde_json::from_value(saved.clone()).context("malformed settings")?;
        let s = &self.settings;
        ensure!(
            saved.unroll_length == s.unroll_length
                && saved.num_unrolls == s.num_unrolls
                && saved.curriculum == s.curriculum
                && saved.min_num_eval == s.min_num_eval
                && saved.validation_problems == s.validation_problems
                && saved.validation_steps == s.validation_steps
                && saved.validation_split == s.validation_split,
            "the run was started with other settings ({saved:?}); resume with the same ones"
        );
        Ok(())
    }

    fn extra(&self) -> CurriculumState {
        self.curriculum.clone()
    }

    fn restore_extra(&mut self, extra: CurriculumState) {
        self.curriculum = extra;
    }

    fn diverged(&self, record: &IterationLog) -> bool {
        record.diverged
    }

    fn progress(&self, l: &MetricsLine<IterationLog>) -> String {
        let r = &l.record;
        let meta = r.meta_losses.iter().sum::<f64>() / r.meta_losses.len().max(1) as f64;
        format!(
            "{}meta-loss {meta:+.4}  objective {:.4} -> {}{}",
            r.stage.map_or(String::new(), |s| format!(
                "stage {s} ({} steps)  ",
                r.num_steps
            )),
            r.initial_objective,
            r.final_objective
                .map_or("n/a".into(), |v| format!("{v:.4}")),
            l.validation_objective
                .map_or(String::new(), |v| format!("  val {v:.4}")),
        )
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
