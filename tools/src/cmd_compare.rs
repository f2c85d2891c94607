//! `metac compare`: several `metac eval` outputs side by side, e.g. the
//! learned optimizers of an ablation (one meta-training per variant), in one
//! table and one plot of mean curves.
//!
//! Each eval directory contributes its optimizers (all, or those named by
//! `--optimizers`): its learned optimizer under its label, a baseline
//! (Adam, SGD, ...) under its own name. A baseline that another eval of the
//! same problem already gave with the same seeds and results is shown once;
//! one that differs is named `label: optimizer`. The evals must measure
//! alike: same split, minibatch size and number of steps; the seeds may
//! differ and are listed per row. Evals of different problems (the training
//! problem and a transfer problem, say) get one panel each in the plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use metac_contract::fsutil::write_atomic;
use metac_runtime::metatest::{OptimizerSummary, Summary, DIVERGENCE_FACTOR};
use metac_runtime::plot::{plot_panels, Line, PlotOptions};
use serde::Serialize;

use crate::common::read_summary_json;
use crate::table::table;

#[derive(Parser, Debug)]
#[command(after_help = "Examples:\n  \
metac compare evals/base=base evals/hessian=+hessian evals/jacob=+jacob --optimizers learned --out evals/ablation\n  \
metac compare evals/relu evals/relu-long --out evals/relu-both\n\n\
Each eval's learned optimizer is named by the eval's label, a baseline by its own name (shown once \
per problem when several evals ran it alike). Evals of several problems get a plot panel each.\n\n\
Writes into OUT: curves.png (the mean curve over seeds of every compared optimizer, or with \
--curve median the median, log scale when every loss is positive), summary.json (per row: label, problem, eval directory, optimizer, and its \
statistics as in the eval's summary.json) and prints the table.")]
pub struct Args {
    /// Eval directories of `metac eval`, each as DIR or DIR=LABEL (default
    /// label: the directory's name).
    #[arg(required = true)]
    pub evals: Vec<String>,
    /// Comma-separated optimizers to take from each eval (default: all).
    #[arg(long)]
    pub optimizers: Option<String>,
    /// The curve plotted per optimizer: the mean over seeds, or the median
    /// (robust to a seed that blows up).
    #[arg(long, value_enum, default_value_t = Statistic::Mean)]
    pub curve: Statistic,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    Mean,
    Median,
}

impl Statistic {
    fn of(self, mut v: Vec<f64>) -> f64 {
        match self {
            Statistic::Mean => v.iter().sum::<f64>() / v.len() as f64,
            Statistic::Median => {
                v.sort_by(f64::total_cmp);
                let n = v.len();
                if n % 2 == 1 {
                    v[n / 2]
                } else {
                    0.5 * (v[n / 2 - 1] + v[n / 2])
                }
            }
        }
    }
}

/// One row of the comparison.
#[derive(Serialize)]
struct Row {
    label: String,
    problem: String,
    eval: PathBuf,
    #[serde(flatten)]
    summary: OptimizerSummary,
}

#[derive(Serialize)]
struct Comparison {
    /// The problems, in the order of the evals (one plot panel each).
    problems: Vec<String>,
    split: Option<String>,
    batch_size: Option<usize>,
    steps: usize,
    rows: Vec<Row>,
}

/// `DIR` or `DIR=LABEL`.
fn parse_eval(s: &str) -> Result<(PathBuf, String)> {
    let (dir, label) = match s.rsplit_once('=') {
        Some((d, l)) => (PathBuf::from(d), l.to_string()),
        None => {
            let d = PathBuf::from(s);
            let l = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("'{s}': give the eval directory a label (DIR=LABEL)"))?;
            (d, l)
        }
    };
    ensure!(!label.is_empty(), "'{s}': empty label");
    Ok((dir, label))
}

fn read_summary(dir: &Path) -> Result<Summary> {
    serde_json::from_value(read_summary_json(dir)?).with_context(|| {
        format!(
            "{}: not an eval summary",
            dir.join("summary.json").display()
        )
    })
}

/// Curve over seeds (`stat` per step) per optimizer, from an eval's
/// `curves.csv` (`optimizer,seed,step,loss`), for the optimizers in `keep`,
/// up to the shortest seed's length.
fn seed_curves(
    dir: &Path,
    keep: &[String],
    stat: Statistic,
) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let p = dir.join("curves.csv");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, "optimizer,seed,step,loss")) => {}
        _ => bail!(
            "{}: expected the header optimizer,seed,step,loss",
            p.display()
        ),
    }
    // optimizer -> seed -> losses in step order.
    let mut runs: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for (i, line) in lines {
        let bad = || format!("{} line {}: '{line}'", p.display(), i + 1);
        // The optimizer label may be quoted and contain commas: split from the right.
        let mut f = line.rsplitn(4, ',');
        let (loss, step, seed, opt) = (f.next(), f.next(), f.next(), f.next());
        let (Some(loss), Some(step), Some(seed), Some(opt)) = (loss, step, seed, opt) else {
            bail!("{}: not 4 fields", bad());
        };
        let opt = opt.trim_matches('"').replace("\"\"", "\"");
        if !keep.contains(&opt) {
            continue;
        }
        let seed: u64 = seed.parse().with_context(bad)?;
        let step: usize = step.parse().with_context(bad)?;
        let loss: f64 = loss.parse().with_context(bad)?;
        let v = runs.entry(opt).or_default().entry(seed).or_default();
        ensure!(step == v.len() + 1, "{}: steps out of order", bad());
        v.push(loss);
    }
    Ok(runs
        .into_iter()
        .map(|(opt, seeds)| {
            let len = seeds.values().map(Vec::len).min().unwrap_or(0);
            let pts = (0..len)
                .map(|t| {
                    (
                        (t + 1) as f64,
                        stat.of(seeds.values().map(|l| l[t]).collect()),
                    )
                })
                .collect();
            (opt, pts)
        })
        .collect())
}

pub fn run(a: Args) -> Result<()> {
    let wanted: Option<Vec<String>> = a
        .optimizers
        .as_ref()
        .map(|s| s.split(',').map(|o| o.trim().to_string()).collect());
    let mut rows: Vec<Row> = vec![];
    // Per row: its curve.
    let mut curves: Vec<Vec<(f64, f64)>> = vec![];
    let mut problems: Vec<String> = vec![];
    let mut first: Option<(PathBuf, Summary)> = None;
    let mut labels: Vec<(String, String)> = vec![];
    for e in &a.evals {
        let (dir, label) = parse_eval(e)?;
        let s = read_summary(&dir)?;
        ensure!(
            !labels.contains(&(s.problem.clone(), label.clone())),
            "label '{label}' is given twice for {} (use DIR=LABEL)",
            s.problem
        );
        labels.push((s.problem.clone(), label.clone()));
        if let Some((d0, s0)) = &first {
            let same = (&s.split, s.batch_size, s.steps) == (&s0.split, s0.batch_size, s0.steps);
            ensure!(
                same,
                "{} measures {} on {:?} (batch {:?}, {} steps) but {} measures {} on {:?} (batch {:?}, {} steps): compare like with like",
                dir.display(),
                s.problem,
                s.split,
                s.batch_size,
                s.steps,
                d0.display(),
                s0.problem,
                s0.split,
                s0.batch_size,
                s0.steps
            );
        }
        if !problems.contains(&s.problem) {
            problems.push(s.problem.clone());
        }
        let take: Vec<OptimizerSummary> = s
            .optimizers
            .iter()
            .filter(|o| wanted.as_ref().is_none_or(|w| w.contains(&o.optimizer)))
            .cloned()
            .collect();
        ensure!(
            !take.is_empty(),
            "{}: none of the optimizers {:?} (it has {:?})",
            dir.display(),
            wanted.as_deref().unwrap_or_default(),
            s.optimizers
                .iter()
                .map(|o| &o.optimizer)
                .collect::<Vec<_>>()
        );
        let names: Vec<String> = take.iter().map(|o| o.optimizer.clone()).collect();
        let mut mc = seed_curves(&dir, &names, a.curve)?;
        for o in take {
            let c = mc
                .remove(&o.optimizer)
                .with_context(|| format!("{}: no curve for '{}'", dir.display(), o.optimizer))?;
            // The learned optimizer is the eval's own; a baseline is named
            // by itself, once per problem when its results are the same.
            let row_label = if o.optimizer == LEARNED {
                label.clone()
            } else {
                let twin = rows
                    .iter()
                    .find(|r| r.problem == s.problem && r.label == o.optimizer);
                match twin {
                    // The same runs (seeds and every statistic).
                    Some(r) if r.summary == o => continue,
                    Some(_) => format!("{label}: {}", o.optimizer),
                    None => o.optimizer.clone(),
                }
            };
            curves.push(c);
            rows.push(Row {
                label: row_label,
                problem: s.problem.clone(),
                eval: dir.clone(),
                summary: o,
            });
        }
        if first.is_none() {
            first = Some((dir, s));
        }
    }
    let (_, s0) = first.context("no eval directories")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let statistic = match a.curve {
        Statistic::Mean => "mean",
        Statistic::Median => "median",
    };
    let panels: Vec<(String, Vec<Line>)> = problems
        .iter()
        .map(|p| {
            let series = rows
                .iter()
                .zip(&curves)
                .filter(|(r, _)| &r.problem == p)
                .map(|(r, c)| {
                    let name = match r.summary.diverged_at.as_slice() {
                        [] => r.label.clone(),
                        at => {
                            let at: Vec<String> = at.iter().map(|s| s.to_string()).collect();
                            format!("{} (diverged at step {})", r.label, at.join(", "))
                        }
                    };
                    (name, c.clone())
                })
                .collect();
            (format!("{p}: {statistic} loss over seeds"), series)
        })
        .collect();
    let cmp = Comparison {
        problems,
        split: s0.split.clone(),
        batch_size: s0.batch_size,
        steps: s0.steps,
        rows,
    };
    let sp = a.out.join("summary.json");
    write_atomic(&sp, (serde_json::to_string_pretty(&cmp)? + "\n").as_bytes())?;
    let png = a.out.join("curves.png");
    let opts = PlotOptions {
        smoothing: (s0.steps / 200).max(1),
        log_y: curves.iter().all(|c| c.iter().all(|&(_, y)| y > 0.0)),
        // Up to the divergence bound: a diverged curve leaves the plot
        // there, and its legend says at which steps its seeds diverged.
        y_max: curves
            .iter()
            .filter_map(|c| c.first().map(|&(_, y)| y))
            .filter(|y| y.is_finite() && *y > 0.0)
            .reduce(f64::max)
            .map(|y| y * f64::from(DIVERGENCE_FACTOR)),
        y_label: if s0.split.is_some() {
            "minibatch loss"
        } else {
            "loss"
        }
        .into(),
        ..PlotOptions::default()
    };
    let refs: Vec<(&str, &[Line])> = panels
        .iter()
        .map(|(t, s)| (t.as_str(), s.as_slice()))
        .collect();
    let plotted = match plot_panels(&png, &refs, &opts) {
        Ok(()) => format!(", {}", png.display()),
        Err(e) => {
            eprintln!("metac compare: warning: no plot written: {e:#}");
            String::new()
        }
    };
    let multi = cmp.problems.len() > 1;
    let labelled: Vec<OptimizerSummary> = cmp
        .rows
        .iter()
        .map(|r| OptimizerSummary {
            optimizer: if multi {
                format!("{}: {}", r.problem, r.label)
            } else {
                r.label.clone()
            },
            ..r.summary.clone()
        })
        .collect();
    print!("{}", table(&labelled, cmp.split.as_deref()));
    println!("wrote {}{plotted}", sp.display());
    Ok(())
}

/// The name of the learned optimizer in an eval.
const LEARNED: &str = "learned";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_arguments_take_optional_labels() {
        assert_eq!(
            parse_eval("evals/base=base line").unwrap(),
            (PathBuf::from("evals/base"), "base line".to_string())
        );
        assert_eq!(
            parse_eval("evals/jacob").unwrap(),
            (PathBuf::from("evals/jacob"), "jacob".to_string())
        );
        assert!(parse_eval("evals/x=").is_err());
    }

    #[test]
    fn curve_statistics() {
        assert_eq!(Statistic::Mean.of(vec![1.0, 2.0, 9.0]), 4.0);
        assert_eq!(Statistic::Median.of(vec![9.0, 1.0, 2.0]), 2.0);
        assert_eq!(Statistic::Median.of(vec![4.0, 1.0, 2.0, 1e9]), 3.0);
    }
}
