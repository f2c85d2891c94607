//! Curves (CSV), summary over seeds (JSON) and mean curves for plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::RunResult;

/// Window of the "final loss": the mean of the last this many recorded steps.
pub const FINAL_WINDOW: usize = 100;
/// The "loss at step 1,000" is the mean of steps 951..=1000.
pub const AT_1000_STEP: usize = 1000;
pub const AT_1000_WINDOW: usize = 50;

/// All runs of a meta-test (every optimizer on every seed, one problem).
#[derive(Clone, Debug, Default)]
pub struct MetaTestResults {
    /// Problem name, e.g. `mnist-mlp`.
    pub problem: String,
    /// Which data split the runs drew batches from and were evaluated on
    /// (None for data-free problems).
    pub split: Option<String>,
    /// Minibatch size (None for data-free problems).
    pub batch_size: Option<usize>,
    pub steps: usize,
    pub runs: Vec<RunResult>,
}

/// Mean and (population, ddof = 0) standard deviation over the seeds that
/// have a value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Some(Stat {
            mean,
            std: var.sqrt(),
            n: values.len(),
        })
    }
}

/// One optimizer's summary over seeds; diverged runs are counted and left
/// out of every statistic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSummary {
    pub optimizer: String,
    pub seeds: Vec<u64>,
    pub diverged: usize,
    /// The step at which each diverged run diverged, in seed order.
    #[serde(default)]
    pub diverged_at: Vec<usize>,
    /// Per seed: mean loss over the last 100 steps.
    pub final_loss: Option<Stat>,
    /// Per seed: mean loss over steps 951..=1000 (None when runs are
    /// shorter than 1,000 steps).
    pub loss_at_1000: Option<Stat>,
    /// The loss of the final parameters (on the split, or for data-free
    /// problems the loss itself).
    pub eval_loss: Option<Stat>,
    /// The accuracy of the final parameters (None for problems that are not
    /// classifiers).
    pub eval_accuracy: Option<Stat>,
}

/// The contents of `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub problem: String,
    /// None (`null`) for data-free problems.
    pub split: Option<String>,
    /// None (`null`) for data-free problems.
    pub batch_size: Option<usize>,
    pub steps: usize,
    /// How the statistics are defined, for readers of the file.
    pub definitions: Vec<String>,
    pub optimizers: Vec<OptimizerSummary>,
}

fn window_mean(losses: &[f32], end: usize, window: usize) -> Option<f64> {
    if end == 0 || end > losses.len() {
        return None;
    }
    let start = end.saturating_sub(window);
    let w = &losses[start..end];
    Some(w.iter().map(|&v| v as f64).sum::<f64>() / w.len() as f64)
}

impl MetaTestResults {
    /// Optimizer labels in order of first appearance.
    pub fn optimizers(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![];
        for r in &self.runs {
            if !v.contains(&r.optimizer) {
                v.push(r.optimizer.clone());
            }
        }
        v
    }

    /// CSV with header `optimizer,seed,step,loss`, one row per recorded step
    /// (steps from 1; losses with full f32 precision). Diverged runs stop at
    /// their last finite step.
    pub fn curves_csv(&self) -> String {
        let mut s = String::from("optimizer,seed,step,loss\n");
        for r in &self.runs {
            for (t, l) in r.losses.iter().enumerate() {
                let _ = writeln!(s, "{},{},{},{}", csv_field(&r.optimizer), r.seed, t + 1, l);
            }
        }
        s
    }

    pub fn write_curves_csv(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.curves_csv())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The summary over seeds, per optimizer.
    pub fn summary(&self) -> Summary {
        let optimizers = self
            .optimizers()
            .into_iter()
            .map(|name| {
                let runs: Vec<&RunResult> =
                    self.runs.iter().filter(|r| r.optimizer == name).collect();
                let ok: Vec<&&RunResult> = runs.iter().filter(|r| !r.diverged()).collect();
                let collect = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Option<Stat> {
                    let v: Vec<f64> = ok.iter().filter_map(|r| f(r)).collect();
                    Stat::of(&v)
                };
                OptimizerSummary {
                    seeds: runs.iter().map(|r| r.seed).collect(),
                    diverged: runs.len() - ok.len(),
                    diverged_at: runs.iter().filter_map(|r| r.diverged_at).collect(),
                    final_loss: collect(&|r| window_mean(&r.losses, r.losses.len(), FINAL_WINDOW)),
                    loss_at_1000: collect(&|r| {
                        window_mean(&r.losses, AT_1000_STEP, AT_1000_WINDOW)
                    }),
                    eval_loss: collect(&|r| r.eval_loss),
                    eval_accuracy: collect(&|r| r.eval_accuracy),
                    optimizer: name,
                }
            })
            .collect();
        Summary {
            problem: self.problem.clone(),
            split: self.split.clone(),
            batch_size: self.batch_size,
            steps: self.steps,
            definitions: self.definitions(),
            optimizers,
        }
    }

    fn definitions(&self) -> Vec<String> {
        let (loss, eval) = match &self.split {
            Some(split) => (
                "minibatch loss",
                format!("eval_loss, eval_accuracy: the final parameters on the whole {split} split (in evaluation-batch chunks)"),
            ),
            None => (
                "loss",
                "eval_loss: the loss at the final parameters; eval_accuracy: their accuracy on the problem's baked data, null for problems that are not classifiers (this problem is data-free: no minibatches, no split)".to_string(),
            ),
        };
        vec![
            format!("final_loss: per seed, the mean {loss} over the last {FINAL_WINDOW} steps; then mean and population std over seeds"),
            format!("loss_at_1000: per seed, the mean {loss} over steps {}..={AT_1000_STEP}; null when runs are shorter", AT_1000_STEP - AT_1000_WINDOW + 1),
            eval,
            format!("diverged: runs whose {loss} became non-finite or exceeded {} times the {loss} of step 1 (where that is positive), or whose final evaluation was non-finite; diverged_at: the step of each, in seed order; left out of every statistic; not evaluated; their parameters are not written", super::DIVERGENCE_FACTOR),
            format!("the {loss} of step t is measured at the parameters before update t"),
        ]
    }

    pub fn write_summary_json(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(&self.summary())?;
        std::fs::write(path, s + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Per optimizer, the mean curve over its non-diverged seeds and, where
    /// some diverged, a second curve over those, labelled with how many and
    /// from which step (`NAME (diverged 2/2, steps 150, 180)`); each up to
    /// its shortest run, as `(step, loss)` points, for
    /// [`crate::plot::plot_curves`].
    pub fn mean_curves(&self) -> Vec<(String, Vec<(f64, f64)>)> {
        let mean = |runs: &[&RunResult]| -> Vec<(f64, f64)> {
            let len = runs.iter().map(|r| r.losses.len()).min().unwrap_or(0);
            (0..len)
                .map(|t| {
                    let m =
                        runs.iter().map(|r| r.losses[t] as f64).sum::<f64>() / runs.len() as f64;
                    ((t + 1) as f64, m)
                })
                .collect()
        };
        let mut out = vec![];
        for name in self.optimizers() {
            let all: Vec<&RunResult> = self.runs.iter().filter(|r| r.optimizer == name).collect();
            let (bad, ok): (Vec<&RunResult>, Vec<&RunResult>) =
                all.iter().copied().partition(|r| r.diverged());
            if !ok.is_empty() {
                out.push((name.clone(), mean(&ok)));
            }
            if !bad.is_empty() {
                let steps: Vec<String> = bad
                    .iter()
                    .filter_map(|r| r.diverged_at.map(|t| t.to_string()))
                    .collect();
                let label = format!(
                    "{name} (diverged {}/{}, step{} {})",
                    bad.len(),
                    all.len(),
                    if steps.len() > 1 { "s" } else { "" },
                    steps.join(", ")
                );
                out.push((label, mean(&bad)));
            }
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opt: &str, seed: u64, losses: Vec<f32>, div: Option<usize>) -> RunResult {
        RunResult {
            optimizer: opt.into(),
            seed,
            steps: 1000,
            losses,
            diverged_at: div,
            eval_loss: div.is_none().then_some(0.5),
            eval_accuracy: div.is_none().then_some(0.9),
            eval_examples: 10,
        }
    }

    #[test]
    fn summary_windows_and_divergence() {
        let a: Vec<f32> = (1..=1000).map(|t| t as f32).collect();
        let b: Vec<f32> = vec![3.0; 1000];
        let r = MetaTestResults {
            problem: "p".into(),
            split: Some("test".into()),
            batch_size: Some(2),
            steps: 1000,
            runs: vec![
                run("x", 1, a, None),
                run("x", 2, b, None),
                run("y", 1, vec![1.0], Some(2)),
            ],
        };
        let s = r.summary();
        let x = &s.optimizers[0];
        // seed 1: mean of 901..=1000 = 950.5; seed 2: 3.
        let f = x.final_loss.as_ref().unwrap();
        assert!((f.mean - (950.5 + 3.0) / 2.0).abs() < 1e-9);
        assert!((f.std - (950.5 - 3.0) / 2.0).abs() < 1e-9);
        // 951..=1000 mean = 975.5.
        assert!((x.loss_at_1000.as_ref().unwrap().mean - (975.5 + 3.0) / 2.0).abs() < 1e-9);
        let y = &s.optimizers[1];
        assert_eq!(y.diverged, 1);
        assert_eq!(y.diverged_at, vec![2]);
        assert!(y.final_loss.is_none());
        assert!(x.diverged_at.is_empty());
        let csv = r.curves_csv();
        assert_eq!(csv.lines().count(), 1 + 2000 + 1);
        assert!(csv.starts_with("optimizer,seed,step,loss\nx,1,1,1\n"));
        let curves = r.mean_curves();
        assert_eq!(curves[0].1[0], (1.0, 2.0));
        // The diverged runs get a curve of their own, labelled with the step.
        assert_eq!(curves[1].0, "y (diverged 1/1, step 2)");
        assert_eq!(curves[1].1.len(), 1);
    }
}
