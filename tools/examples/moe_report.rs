//! The comparison of `docs/results.md` for the Tiny-ONN workload: runs of
//! `metac run` of MoE bundles (the hyper step and its baselines) side by
//! side, at the same number of training bytes.
//!
//! ```sh
//! cargo run --release -p metac --example moe_report -- \
//!     --run "hyper step=runs/moe" --run "top-2 + balance=runs/moe-top2" \
//!     --run "dense SwiGLU=runs/moe-dense" --out docs/img/moe
//! ```
//!
//! Writes to OUT:
//! * `report.md`: per run, the held-out bits per byte of its best weights,
//!   and per block the mean active experts and gating accuracy, the
//!   parameters a token uses, the training bytes and time;
//! * `curves.png`: held-out bits per byte against training bytes;
//! * `active-experts.png`: mean active experts per token (held out, per
//!   block) over training;
//! * `gating.png`: gating accuracy (held out, per block) over training;
//! * `surprise.png`: the distribution of the held-out surprise of the best
//!   weights, per run and block (log10, share of token-expert pairs per bin);
//! * `expert-usage.png`: the share of held-out token assignments each
//!   expert takes, per run and block, experts sorted by share.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use metac_contract::fsutil::write_atomic;
use metac_runtime::plot::{plot_curves_with, PlotOptions};

#[derive(Parser)]
struct Args {
    /// NAME=RUN: a run directory of `metac run` of a MoE bundle.
    #[arg(long)]
    run: Vec<String>,
    #[arg(long)]
    out: PathBuf,
}

fn json(p: &Path) -> Result<serde_json::Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))
}

struct Run {
    name: String,
    summary: serde_json::Value,
    lines: Vec<serde_json::Value>,
    /// Bytes per step (batch x context).
    bytes_per_step: f64,
}

fn load(spec: &str) -> Result<Run> {
    let (name, dir) = spec
        .split_once('=')
        .with_context(|| format!("--run {spec}: expected NAME=RUN"))?;
    let dir = PathBuf::from(dir);
    let summary = json(&dir.join("summary.json"))?;
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .with_context(|| format!("{}: no metrics.jsonl", dir.display()))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()?;
    let steps = summary["steps"].as_f64().unwrap_or(1.0).max(1.0);
    let bytes_per_step = summary["tokens"].as_f64().unwrap_or(0.0) / steps;
    Ok(Run {
        name: name.to_string(),
        summary,
        lines,
        bytes_per_step,
    })
}

/// `(training bytes, validation[key])` for every validated iteration.
fn validation_curve(r: &Run, key: &str) -> Vec<(f64, f64)> {
    let mut steps = 0.0;
    let mut v = vec![];
    for l in &r.lines {
        steps += l["steps"].as_f64().unwrap_or(0.0);
        if let Some(y) = l["validation"][key].as_f64() {
            v.push((steps * r.bytes_per_step / 1e6, y));
        }
    }
    v
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(!a.run.is_empty(), "give at least one --run NAME=RUN");
    let runs = a.run.iter().map(|s| load(s)).collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&a.out)?;
    let lin = |x: &str, y: &str| PlotOptions {
        log_y: false,
        x_label: x.into(),
        y_label: y.into(),
        ..PlotOptions::default()
    };
    let layers = runs
        .iter()
        .map(|r| floats(&r.summary["heldout"]["mean_k"]).len())
        .max()
        .unwrap_or(0);
    // Held-out bits per byte.
    let series: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| (r.name.clone(), validation_curve(r, "bits_per_byte")))
        .collect();
    plot_curves_with(
        &a.out.join("curves.png"),
        "held-out bits per byte",
        &series,
        &lin("training bytes (millions)", "bits per byte"),
    )?;
    // Active experts and gating accuracy over training, per block.
    for (key, file, title, y) in [
        (
            "mean_k",
            "active-experts.png",
            "mean active experts per token (held out)",
            "experts",
        ),
        (
            "gating_accuracy",
            "gating.png",
            "gating accuracy (held out)",
            "fraction of tokens",
        ),
    ] {
        let mut series = vec![];
        for r in &runs {
            for l in 0..layers {
                let c = validation_curve(r, &format!("{key}.l{l}"));
                if !c.is_empty() {
                    series.push((format!("{}, block {l}", r.name), c));
                }
            }
        }
        if !series.is_empty() {
            plot_curves_with(
                &a.out.join(file),
                title,
                &series,
                &lin("training bytes (millions)", y),
            )?;
        }
    }
    // Surprise histograms (log10 bins) and expert usage.
    let mut hist = vec![];
    let mut usage = vec![];
    for r in &runs {
        let h = &r.summary["heldout"];
        let sur = h["surprise"].as_array().cloned().unwrap_or_default();
        for (l, s) in sur.iter().enumerate() {
            let v: Vec<f64> = floats(s)
                .into_iter()
                .filter(|x| *x > 0.0)
                .map(f64::log10)
                .collect();
            if v.is_empty() {
                continue;
            }
            let (lo, hi) = (-6.0f64, 0.0f64);
            let bins = 60;
            let mut counts = vec![0.0; bins];
            for x in &v {
                let i = (((x - lo) / (hi - lo)) * bins as f64).floor();
                let i = (i.max(0.0) as usize).min(bins - 1);
                counts[i] += 1.0;
            }
            let n = v.len() as f64;
            hist.push((
                format!("{}, block {l}", r.name),
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (lo + (i as f64 + 0.5) * (hi - lo) / bins as f64, c / n))
                    .collect(),
            ));
        }
        for (l, e) in h["expert_tokens"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let mut v = floats(e);
            let total: f64 = v.iter().sum();
            if total <= 0.0 {
                continue;
            }
            v.sort_by(|a, b| b.total_cmp(a));
            usage.push((
                format!("{}, block {l}", r.name),
                v.iter()
                    .enumerate()
                    .map(|(i, x)| ((i + 1) as f64, x / total))
                    .collect(),
            ));
        }
    }
    if !hist.is_empty() {
        plot_curves_with(
            &a.out.join("surprise.png"),
            "held-out surprise ||J_e^T dL/dy|| of every token and expert",
            &hist,
            &lin("log10 surprise", "share of token-expert pairs"),
        )?;
    }
    if !usage.is_empty() {
        plot_curves_with(
            &a.out.join("expert-usage.png"),
            "share of held-out token assignments per expert (sorted)",
            &usage,
            &lin("expert, by share", "share of assignments"),
        )?;
    }
    // The table.
    let mut md = String::from(
        "| run | training bytes | held-out bits/byte | mean active experts per block | gating accuracy per block | parameters (used per token) | time |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &runs {
        let s = &r.summary;
        let h = &s["heldout"];
        let fmt = |v: Vec<f64>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        md += &format!(
            "| {} | {:.1} M | {:.3} | {} | {} | {} ({:.0}) | {:.0} s |\n",
            r.name,
            s["tokens"].as_f64().unwrap_or(0.0) / 1e6,
            h["bits_per_byte"].as_f64().unwrap_or(f64::NAN),
            fmt(floats(&h["mean_k"])),
            fmt(floats(&h["gating_accuracy"])),
            s["params"],
            s["active_params"].as_f64().unwrap_or(0.0),
            s["seconds"].as_f64().unwrap_or(0.0),
        );
    }
    write_atomic(&a.out.join("report.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}
