//! Meta-training the editor ([`EditorWorkload`], a [`Workload`] of the
//! generic driver), as the seed's loop: one iteration is a trajectory of
//! `batches` batches of `edits` edits of meta-training facts. Each batch is
//! cached, turned into shifts and applied (the edits stay in the LM until
//! the trajectory ends when `sequential`); the meta-loss's gradient is
//! carried back to the hypernetwork and summed over `accumulate` batches
//! per Adam step. After the trajectory the LM is reset; validation edits a
//! fixed batch of validation facts into the unedited LM and measures ES,
//! GS and LS.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::read_safetensors;
use metac_contract::editor::EditorRunSettings;
use metac_graphs::Tensor;
use serde::{Deserialize, Serialize};

use super::{EditScores, Editor, RunningNorm};
use crate::data::facts::{EditRequest, Split};
use crate::trainer::{MetricsLine, Validation, Workload, BEST_WEIGHTS, CHECKPOINT_WEIGHTS};

pub use crate::trainer::{RunRecord, RUN_RECORD};

/// Which hypernetwork of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunWeights {
    /// `best.safetensors`: the best validation's.
    Best,
    /// `checkpoint.safetensors`: the last trajectory's.
    Final,
}

impl Editor {
    /// Take the hypernetwork and normalisers of the run in `run`.
    pub fn load_run(&mut self, run: &Path, weights: RunWeights) -> Result<()> {
        let (file, why) = match weights {
            RunWeights::Best => (
                BEST_WEIGHTS,
                "the run has not validated yet; its last checkpoint is the final weights",
            ),
            RunWeights::Final => (CHECKPOINT_WEIGHTS, "the run has not completed a trajectory"),
        };
        let p = run.join(file);
        ensure!(p.is_file(), "{}: not found ({why})", p.display());
        let what = p.display().to_string();
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {what}"))?;
        self.load_hyper(&read_safetensors(&bytes, &what)?, &what, false)
    }
}

/// One trajectory's line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrajectoryLog {
    /// Mean meta-loss over the trajectory's batches.
    pub meta_loss: f64,
    /// Hypernetwork updates and the mean gradient norm before clipping.
    pub updates: usize,
    pub grad_norm: f64,
    /// Edits per second (validation excluded).
    pub edits_per_second: f64,
}

/// The meta-training of an editor; see the module docs.
pub struct EditorWorkload {
    pub editor: Editor,
    settings: EditorRunSettings,
    validation: Vec<EditRequest>,
    /// ES, GS and LS of the unedited LM on the validation edits.
    pub before: EditScores,
}

/// The seed of trajectory `t`'s batch `k`.
fn batch_seed(seed: u64, t: usize, k: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((t as u64 + 1) << 20) ^ (k as u64 + 1)
}

/// The seed of the validation batch (no trajectory's).
fn validation_seed(seed: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl EditorWorkload {
    pub fn new(mut editor: Editor, settings: EditorRunSettings) -> Result<Self> {
        settings.validate()?;
        let validation = editor.world.edit_requests(
            Split::Validation,
            settings.validation_edits,
            editor.meta.unrelated,
            validation_seed(settings.seed),
        )?;
        let before = editor.measure(&validation)?;
        Ok(EditorWorkload {
            editor,
            settings,
            validation,
            before,
        })
    }

    /// The fixed validation edits.
    pub fn validation_requests(&self) -> &[EditRequest] {
        &self.validation
    }

    /// Edit `reqs` into the unedited LM and measure (the normalisers stay).
    pub fn evaluate_edits(&mut self, reqs: &[EditRequest]) -> Result<EditScores> {
        self.editor.reset();
        let applied = self.editor.edit(reqs, false)?;
        let s = self.editor.measure(reqs);
        self.editor.undo(applied)?;
        self.editor.reset();
        s
    }
}

/// Norm statistics carried in `checkpoint.json` (f64, so that a resume is
/// exact).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NormState(pub Vec<RunningNorm>);

impl Workload for EditorWorkload {
    type Record = TrajectoryLog;
    type Extra = NormState;

    fn iteration(&mut self, t: usize) -> Result<TrajectoryLog> {
        let t0 = Instant::now();
        let s = self.settings.clone();
        let per_update = s.batches_per_update();
        let mut grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let (mut loss, mut updates, mut norm_sum) = (0.0, 0, 0.0);
        self.editor.reset();
        for k in 0..s.batches {
            let reqs = self.editor.world.edit_requests(
                Split::Train,
                s.edits,
                self.editor.meta.unrelated,
                batch_seed(s.seed, t, k),
            )?;
            let reference = self.editor.reference(&reqs)?;
            let applied = self.editor.edit(&reqs, true)?;
            loss += self
                .editor
                .meta_backward(&reqs, &applied, &reference, &mut grads)?;
            if !s.sequential {
                self.editor.undo(applied)?;
            }
            if (k + 1) % per_update == 0 || k + 1 == s.batches {
                norm_sum += self.editor.update(&grads)?;
                updates += 1;
                grads.clear();
            }
        }
        self.editor.reset();
        Ok(TrajectoryLog {
            meta_loss: loss / s.batches as f64,
            updates,
            grad_norm: norm_sum / updates as f64,
            edits_per_second: (s.batches * s.edits) as f64 / t0.elapsed().as_secs_f64(),
        })
    }

    fn validate(&mut self) -> Result<Validation> {
        let reqs = self.validation.clone();
        let sc = self.evaluate_edits(&reqs)?;
        let mean = (sc.es + sc.gs + sc.ls) / 3.0;
        Ok(Validation {
            objective: 1.0 - mean,
            metrics: BTreeMap::from([
                ("es".to_string(), sc.es),
                ("gs".to_string(), sc.gs),
                ("ls".to_string(), sc.ls),
            ]),
        })
    }

    /// The hypernetwork and the normalisers' statistics (what editing
    /// needs); with the optimizer, Adam's state too.
    fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self
            .editor
            .hyper
            .iter()
            .map(|(n, t)| (n.clone(), t.to_graph()))
            .collect();
        for (k, norm) in self.editor.norms.iter().enumerate() {
            let (m, s) = norm.tensors();
            v.push((format!("norm.g{k}.mean"), m.to_graph()));
            v.push((format!("norm.g{k}.std"), s.to_graph()));
        }
        if with_optimizer {
            v.extend(
                self.editor
                    .adam_state
                    .iter()
                    .map(|(n, t)| (n.clone(), t.to_graph())),
            );
        }
        Ok(v)
    }

    fn load_weights(&mut self, tensors: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        self.editor.load_hyper(tensors, what, true)
    }

    /// What shapes a trajectory; the number of trajectories and the
    /// validation period may change.
    fn settings(&self) -> serde_json::Value {
        let s = &self.settings;
        serde_json::json!({
            "batches": s.batches,
            "edits": s.edits,
            "accumulate": s.accumulate,
            "sequential": s.sequential,
            "seed": s.seed,
            "validation_edits": s.validation_edits,
        })
    }

    fn extra(&self) -> NormState {
        NormState(self.editor.norms.clone())
    }

    fn restore_extra(&mut self, extra: NormState) {
        if extra.0.len() == self.editor.norms.len() {
            self.editor.norms = extra.0;
        }
    }

    fn diverged(&self, r: &TrajectoryLog) -> bool {
        !r.meta_loss.is_finite()
    }

    fn progress(&self, l: &MetricsLine<TrajectoryLog>) -> String {
        let v = &l.validation;
        let scores = match (v.get("es"), v.get("gs"), v.get("ls")) {
            (Some(e), Some(g), Some(s)) => format!("  ES {e:.3} GS {g:.3} LS {s:.3}"),
            _ => String::new(),
        };
        format!(
            "trajectory {}  meta-loss {:.4}  |g| {:.3}{scores}  {:.0} edits/s",
            l.iteration + 1,
            l.record.meta_loss,
            l.record.grad_norm,
            l.record.edits_per_second
        )
    }
}
