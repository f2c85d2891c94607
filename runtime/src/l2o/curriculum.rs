//! Curriculum learning of the L2O-Entropy seed (section 5.1): meta-train on
//! a list of increasing horizons (inner steps per meta-iteration, e.g.
//! `[100, 200, 500, 1000, ...]`). At a stage, after at least `min_num_eval`
//! validations: if one of them set a new best, the stage's best
//! meta-parameters are restored and the next stage begins; if none did,
//! meta-training stops.
//!
//! **Choices** (the seed leaves them open):
//! * Validation at a stage runs the stage's horizon, and the best validation
//!   objective is kept across stages, so a stage "improves" when training at
//!   the longer horizon reaches a lower objective than anything before it.
//! * At the last stage an improving round of `min_num_eval` validations
//!   starts another round at that stage; a round without improvement stops.
//! * The stage and its counters are part of the checkpoint, so a resumed run
//!   continues the curriculum where it was.

use serde::{Deserialize, Serialize};

pub use metac_contract::l2o::Curriculum;

/// Where a run is in its curriculum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct CurriculumState {
    pub stage: usize,
    /// Validations at this stage (this round).
    pub num_eval: usize,
    /// Whether one of them set a new best.
    pub improved: bool,
    /// The curriculum stopped meta-training.
    pub stopped: bool,
}

/// What to do after a validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep training at this stage.
    Stay,
    /// Restore the stage's best meta-parameters and go to the next stage.
    Advance,
    /// Stop meta-training.
    Stop,
}

impl CurriculumState {
    /// Inner steps per meta-iteration at the current stage.
    pub fn steps(&self, c: &Curriculum) -> usize {
        c.steps[self.stage.min(c.steps.len() - 1)]
    }

    /// Record a validation (`improved`: it set a new best) and decide.
    pub fn after_validation(&mut self, c: &Curriculum, improved: bool) -> Decision {
        self.num_eval += 1;
        self.improved |= improved;
        if self.num_eval < c.min_num_eval {
            return Decision::Stay;
        }
        if !self.improved {
            self.stopped = true;
            return Decision::Stop;
        }
        self.num_eval = 0;
        self.improved = false;
        if self.stage + 1 < c.steps.len() {
            self.stage += 1;
            Decision::Advance
        } else {
            Decision::Stay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_after_min_evaluations_and_stops_without_improvement() {
        let c = Curriculum {
            steps: vec![100, 200, 500],
            min_num_eval: 3,
        };
        let mut s = CurriculumState::default();
        assert_eq!(s.steps(&c), 100);
        assert_eq!(s.after_validation(&c, true), Decision::Stay);
        assert_eq!(s.after_validation(&c, false), Decision::Stay);
        assert_eq!(s.after_validation(&c, false), Decision::Advance);
        assert_eq!((s.stage, s.num_eval, s.improved), (1, 0, false));
        assert_eq!(s.steps(&c), 200);
        for _ in 0..2 {
            assert_eq!(s.after_validation(&c, false), Decision::Stay);
        }
        assert_eq!(s.after_validation(&c, true), Decision::Advance);
        assert_eq!(s.steps(&c), 500);
        // The last stage: an improving round stays, a flat round stops.
        for d in [Decision::Stay, Decision::Stay, Decision::Stay] {
            assert_eq!(s.after_validation(&c, true), d);
        }
        assert_eq!(s.stage, 2);
        for d in [Decision::Stay, Decision::Stay, Decision::Stop] {
            assert_eq!(s.after_validation(&c, false), d);
        }
        assert!(s.stopped);
    }
}
