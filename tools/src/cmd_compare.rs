//! `metac compare`: several `metac eval` outputs side by side, e.g. the
//! learned optimizers of an ablation (one meta-training per variant), in one
//! table and one plot of mean curves.
//!
//! Each eval directory contributes its optimizers (all, or those named by
//! `--optimizers`) under its label. The evals must measure the same thing:
//! same problem, split, minibatch size and number of steps; the seeds may
//! differ and are listed per row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use metac_contract::fsutil::write_atomic;
use metac_runtime::metatest::{OptimizerSummary, Summary};
use metac_runtime::plot::{plot_curves_with, PlotOptions};
use serde::Serialize;

use crate::common::read_summary_json;
use crate::table::table;

#[derive(Parser, Debug)]
#[command(after_help = "Examples:\n  \
metac compare evals/base=base evals/hessian=+hessian evals/jacob=+jacob --optimizers learned --out evals/ablation\n  \
metac compare evals/relu evals/relu-long --out evals/relu-both\n\n\
Writes into OUT: curves.png (the mean curve over seeds of every compared optimizer, or with \
--curve median the median, log scale when every loss is positive), summary.json (per row: label, eval directory, optimizer, and its \
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
    eval: PathBuf,
    #[serde(flatten)]
    summary: OptimizerSummary,
}

#[derive(Serialize)]
struct Comparison {
    problem: String,
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
    let mut rows = vec![];
    let mut curves = vec![];
    let mut first: Option<(PathBuf, Summary)> = None;
    let mut labels = vec![];
    for e in &a.evals {
        let (dir, label) = parse_eval(e)?;
        ensure!(
            !labels.contains(&label),
            "label '{label}' is given twice (use DIR=LABEL)"
        );
        labels.push(label.clone());
        let s = read_summary(&dir)?;
        if let Some((d0, s0)) = &first {
            let same = (&s.problem, &s.split, s.batch_size, s.steps)
                == (&s0.problem, &s0.split, s0.batch_size, s0.steps);
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
            // One optimizer per eval: the label alone names the row.
            let row_label = if names.len() == 1 {
                label.clone()
            } else {
                format!("{label}: {}", o.optimizer)
            };
            let c = mc
                .remove(&o.optimizer)
                .with_context(|| format!("{}: no curve for '{}'", dir.display(), o.optimizer))?;
            curves.push((row_label.clone(), c));
            rows.push(Row {
                label: row_label,
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
    let cmp = Comparison {
        problem: s0.problem.clone(),
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
        log_y: curves.iter().all(|(_, c)| c.iter().all(|&(_, y)| y > 0.0)),
        y_label: if s0.split.is_some() {
            "minibatch loss"
        } else {
            "loss"
        }
        .into(),
        ..PlotOptions::default()
    };
    let title = format!(
        "{}: {} loss over seeds",
        s0.problem,
        match a.curve {
            Statistic::Mean => "mean",
            Statistic::Median => "median",
        }
    );
    let plotted = match plot_curves_with(&png, &title, &curves, &opts) {
        Ok(()) => format!(", {}", png.display()),
        Err(e) => {
            eprintln!("metac compare: warning: no plot written: {e:#}");
            String::new()
        }
    };
    let labelled: Vec<OptimizerSummary> = cmp
        .rows
        .iter()
        .map(|r| OptimizerSummary {
            optimizer: r.label.clone(),
            ..r.summary.clone()
        })
        .collect();
    print!("{}", table(&labelled, cmp.split.as_deref()));
    println!("wrote {}{plotted}", sp.display());
    Ok(())
}

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
