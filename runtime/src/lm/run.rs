//! Training a language-model bundle ([`LmWorkload`], a [`Workload`] of the
//! generic driver): one iteration is one epoch, a pass over the pretraining
//! prompts in an order drawn from the run's seed, one compiled
//! `train_step` (forward, gradient, Adam) per batch, parameters and Adam's
//! moments carried between steps by the host.
//!
//! Validation measures answer accuracy on held-out paraphrases and on a
//! fixed sample of training-template prompts; its objective is one minus
//! their mean, so the best weights are those that both know the facts and
//! answer their unseen paraphrases.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::Bundle;
use metac_contract::init::SeededRng;
use metac_contract::lm::{LmData, LmMeta, LmRunSettings, LrSchedule, LM_TRAIN_STEP};
use metac_graphs::Tensor;
use serde::{Deserialize, Serialize};

use super::{answer_batch, Evaluator, Scores};
use crate::backend::{Backend, Session};
use crate::data::facts::{FactWorld, Prompt};
use crate::tensor::{draw_named, graph_tensors, restore_named, HostTensor, Named};
use crate::trainer::{MetricsLine, Validation, Workload};

/// Training-template prompts in the validation's sample.
pub const TRAIN_SAMPLE: usize = 5000;

/// The prompts of an LM bundle's data.
pub struct LmPrompts {
    /// What the model trains on.
    pub pretraining: Vec<Prompt>,
    /// Every fact under its training templates.
    pub training_templates: Vec<Prompt>,
    /// The paraphrases no pretraining prompt shows.
    pub heldout: Vec<Prompt>,
}

impl LmPrompts {
    /// Generate the bundle's data and check that it fits the compiled graphs.
    pub fn of(meta: &LmMeta) -> Result<Self> {
        let LmData::Facts(wc) = &meta.data;
        let world = FactWorld::generate(wc)?;
        ensure!(
            world.vocab.len() == meta.model.vocab,
            "the fact world has {} words; the bundle's model {} (a bundle of another world or version)",
            world.vocab.len(),
            meta.model.vocab
        );
        let longest = world.longest_prompt();
        ensure!(
            longest <= meta.seq,
            "prompts of {longest} tokens exceed the bundle's sequence length {}",
            meta.seq
        );
        Ok(LmPrompts {
            pretraining: world.pretraining_prompts(),
            training_templates: world.training_prompts(),
            heldout: world.heldout_prompts(),
        })
    }
}

/// One epoch's line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    /// Mean training loss over the epoch's steps (before each update).
    pub loss: f64,
    pub steps: usize,
    /// The learning rate's multiplier at the epoch's last step.
    pub lr_scale: f32,
    /// Training throughput (prompts per second, validation excluded).
    pub prompts_per_second: f64,
}

/// The accuracies and likelihoods of a model on its world's prompt sets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LmReport {
    pub train_template_accuracy: f64,
    pub train_template_nll: f64,
    pub heldout_paraphrase_accuracy: f64,
    pub heldout_paraphrase_nll: f64,
    /// Prompts in each set.
    pub train_template_prompts: usize,
    pub heldout_paraphrase_prompts: usize,
}

/// See the module docs.
pub struct LmWorkload {
    pub meta: LmMeta,
    settings: LmRunSettings,
    step: Box<dyn Session>,
    eval: Evaluator,
    params: Named<HostTensor>,
    state: Named<HostTensor>,
    prompts: LmPrompts,
    /// A fixed sample of the training-template prompts, for validation.
    train_sample: Vec<Prompt>,
    /// The bundle's manifest hash (the run's identity).
    pub manifest_sha256: String,
}

impl LmWorkload {
    /// Training of `bundle` with `settings`, from parameters drawn with the
    /// settings' seed.
    pub fn new(bundle: &Bundle, backend: &dyn Backend, settings: LmRunSettings) -> Result<Self> {
        let meta = LmMeta::from_manifest(&bundle.manifest)
            .with_context(|| format!("{}", bundle.dir.display()))?;
        settings.validate()?;
        let prompts = LmPrompts::of(&meta)?;
        let step = backend.load(&bundle.graph_bytes(LM_TRAIN_STEP)?, LM_TRAIN_STEP)?;
        let eval = Evaluator::new(bundle, &meta, backend)?;
        let mut rng = SeededRng::new(settings.seed, 0);
        let n = prompts.training_templates.len();
        let train_sample = (0..TRAIN_SAMPLE.min(n))
            .map(|_| prompts.training_templates[rng.below(n as u64) as usize].clone())
            .collect();
        Ok(LmWorkload {
            params: draw_named(&meta.init, settings.seed),
            state: draw_named(&meta.state_init, settings.seed),
            meta,
            settings,
            step,
            eval,
            prompts,
            train_sample,
            manifest_sha256: bundle.manifest_sha256()?,
        })
    }

    /// The model's parameters, by name.
    pub fn params(&self) -> &Named<HostTensor> {
        &self.params
    }

    /// Accuracy and likelihood on every training-template prompt and every
    /// held-out paraphrase.
    pub fn report(&mut self) -> Result<LmReport> {
        let t = self
            .eval
            .scores(&self.params, &self.prompts.training_templates)?;
        let h = self.eval.scores(&self.params, &self.prompts.heldout)?;
        Ok(LmReport {
            train_template_accuracy: t.accuracy(),
            train_template_nll: t.mean_nll(),
            heldout_paraphrase_accuracy: h.accuracy(),
            heldout_paraphrase_nll: h.mean_nll(),
            train_template_prompts: t.correct.len(),
            heldout_paraphrase_prompts: h.correct.len(),
        })
    }

    /// The prompts of epoch `epoch`: a permutation of the pretraining
    /// prompts from the seed's stream `1 + epoch`.
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let n = self.prompts.pretraining.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SeededRng::new(self.settings.seed, 1 + epoch as u64);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        order
    }
}

impl Workload for LmWorkload {
    type Record = EpochLog;
    type Extra = ();

    fn iteration(&mut self, epoch: usize) -> Result<EpochLog> {
        let t0 = Instant::now();
        let order = self.epoch_order(epoch);
        let (b, t) = (self.meta.batch, self.meta.seq);
        let steps = order.len() / b;
        ensure!(
            steps > 0,
            "{} pretraining prompts make no batch of {b}",
            order.len()
        );
        let io = &self.meta.train_step;
        let total = steps * self.settings.epochs;
        let warmup = (self.settings.warmup_epochs * steps as f64).round() as usize;
        let mut sum = 0.0;
        let mut scale = 1.0;
        for k in 0..steps {
            scale = self.settings.lr_scale(epoch * steps + k, total, warmup);
            let lr_scale = HostTensor::scalar_f32(scale);
            let picked: Vec<&Prompt> = order[k * b..(k + 1) * b]
                .iter()
                .map(|&i| &self.prompts.pretraining[i])
                .collect();
            let data = answer_batch(&picked, b, t)?;
            let mut ins: Vec<(&str, &HostTensor)> = vec![];
            ins.extend(self.params.iter().map(|(n, t)| (n.as_str(), t)));
            ins.extend(self.state.iter().map(|(n, t)| (n.as_str(), t)));
            ins.extend(io.batch.iter().map(String::as_str).zip(&data));
            ins.push((self.meta.lr_scale.as_str(), &lr_scale));
            let mut out: HashMap<String, HostTensor> = self.step.run(&ins)?.into_iter().collect();
            sum += f64::from(
                out.remove(&io.loss)
                    .context("train_step: no loss")?
                    .to_scalar_f32()?,
            );
            for ((_, p), name) in self.params.iter_mut().zip(&io.new_params) {
                *p = out
                    .remove(name)
                    .with_context(|| format!("train_step: no output '{name}'"))?;
            }
            for ((_, s), name) in self.state.iter_mut().zip(&io.new_state) {
                *s = out
                    .remove(name)
                    .with_context(|| format!("train_step: no output '{name}'"))?;
            }
        }
        Ok(EpochLog {
            loss: sum / steps as f64,
            steps,
            lr_scale: scale,
            prompts_per_second: (steps * b) as f64 / t0.elapsed().as_secs_f64(),
        })
    }

    fn validate(&mut self) -> Result<Validation> {
        let h: Scores = self.eval.scores(&self.params, &self.prompts.heldout)?;
        let t: Scores = self.eval.scores(&self.params, &self.train_sample)?;
        let (ha, ta) = (h.accuracy(), t.accuracy());
        let finite = h.nll.iter().chain(&t.nll).all(|x| x.is_finite());
        Ok(Validation {
            objective: if finite {
                1.0 - (ha + ta) / 2.0
            } else {
                f64::INFINITY
            },
            metrics: BTreeMap::from([
                ("heldout_accuracy".to_string(), ha),
                ("heldout_nll".to_string(), h.mean_nll()),
                ("train_accuracy".to_string(), ta),
                ("train_nll".to_string(), t.mean_nll()),
            ]),
        })
    }

    fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, Tensor)>> {
        Ok(if with_optimizer {
            graph_tensors(&[&self.params, &self.state])
        } else {
            graph_tensors(&[&self.params])
        })
    }

    fn load_weights(&mut self, tensors: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        restore_named(&mut self.params, tensors, what)?;
        restore_named(&mut self.state, tensors, what)
    }

    /// The seed, validation period and schedule; the number of epochs may
    /// change where the schedule does not depend on it (constant, no
    /// warm-up).
    fn settings(&self) -> serde_json::Value {
        let s = &self.settings;
        let fixed_length = s.schedule != LrSchedule::Constant || s.warmup_epochs > 0.0;
        serde_json::json!({
            "seed": s.seed,
            "evaluation_period": s.evaluation_period,
            "schedule": s.schedule,
            "warmup_epochs": s.warmup_epochs,
            "epochs": if fixed_length { Some(s.epochs) } else { None },
        })
    }

    fn extra(&self) {}
    fn restore_extra(&mut self, _extra: ()) {}

    fn diverged(&self, r: &EpochLog) -> bool {
        !r.loss.is_finite()
    }

    fn progress(&self, l: &MetricsLine<EpochLog>) -> String {
        let v = &l.validation;
        let acc = match (v.get("train_accuracy"), v.get("heldout_accuracy")) {
            (Some(t), Some(h)) => format!("  accuracy: train {t:.4}, held-out paraphrases {h:.4}"),
            _ => String::new(),
        };
        format!(
            "epoch {}  loss {:.4}{acc}  {:.0} prompts/s",
            l.iteration + 1,
            l.record.loss,
            l.record.prompts_per_second
        )
    }
}
