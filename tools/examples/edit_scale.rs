//! The scale study of `docs/results.md`: ES, GS, LS and the time of one
//! edit at 1 to 4,096 simultaneous edits, for meta-trained editors (MALMEN,
//! MEND: `metac run` directories of editor bundles) and the fine-tuning
//! baseline, on facts of the evaluation subjects (never edited in
//! meta-training).
//!
//! ```sh
//! cargo run --release -p metac --example edit_scale -- \
//!     --editor MALMEN=runs/editor --editor MEND=runs/editor-mend \
//!     --ft runs/editor --ft-steps 1,20 --ft-lr 1e-1,1e-1 \
//!     --edits 1,16,128,1024,4096 --out docs/img/edit-scale
//! ```
//!
//! Small edit counts are repeated on fresh draws (`--min-edits` edits in
//! all per count, at least one draw) and averaged, each draw edited into the
//! unedited LM. Writes `OUT/scale.json`, `OUT/scale.md` (the table) and
//! `OUT/scale.png` (ES and LS against the number of edits).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use metac_contract::fsutil::write_atomic;
use metac_runtime::backend::{open_backend, BackendOptions};
use metac_runtime::data::facts::Split;
use metac_runtime::editor::run::{RunRecord, RunWeights};
use metac_runtime::editor::{EditScores, Editor};
use metac_runtime::plot::{plot_curves_with, PlotOptions};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// NAME=RUN: a meta-trained editor (its best hypernetwork).
    #[arg(long)]
    editor: Vec<String>,
    /// An editor run whose bundle fine-tuning (FT) uses (its LM and layers).
    #[arg(long)]
    ft: Option<PathBuf>,
    /// Comma-separated FT budgets (Adam steps), each its own method ...
    #[arg(long, value_delimiter = ',', default_value = "20")]
    ft_steps: Vec<usize>,
    /// ... at these learning rates (one per budget).
    #[arg(long, value_delimiter = ',', default_value = "1e-3")]
    ft_lr: Vec<f32>,
    /// Comma-separated numbers of simultaneous edits.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024,4096")]
    edits: Vec<usize>,
    /// Edits in all per count (small counts are repeated).
    #[arg(long, default_value_t = 256)]
    min_edits: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows of earlier `OUT/scale.json` files to put first in the table
    /// and the plot (e.g. FT measured with fewer draws).
    #[arg(long)]
    include: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Serialize, Deserialize)]
struct Row {
    method: String,
    edits: usize,
    draws: usize,
    scores: EditScores,
    /// Mean seconds of one edit (cache, values, solve and apply; FT: its
    /// steps), measurement excluded.
    seconds: f64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        !a.editor.is_empty() || a.ft.is_some() || !a.include.is_empty(),
        "name an --editor NAME=RUN, --ft RUN or --include FILE"
    );
    let mut rows: Vec<Row> = vec![];
    for p in &a.include {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let more: Vec<Row> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        rows.extend(more);
    }
    let backend = open_backend(&BackendOptions::default())?;
    let mut methods: Vec<(String, Editor)> = vec![];
    for spec in &a.editor {
        let (name, run) = spec
            .split_once('=')
            .with_context(|| format!("--editor {spec}: expected NAME=RUN"))?;
        let run = PathBuf::from(run);
        let bundle = RunRecord::bundle_of(&run, None)?;
        let mut e = Editor::new(&bundle, backend.as_ref(), 0)?;
        e.load_run(&run, RunWeights::Best)?;
        methods.push((name.to_string(), e));
    }
    ensure!(
        a.ft_steps.len() == a.ft_lr.len(),
        "--ft-steps and --ft-lr need one entry each per FT budget"
    );
    let mut ft = vec![];
    if let Some(run) = &a.ft {
        let bundle = RunRecord::bundle_of(run, None)?;
        for (&steps, &lr) in a.ft_steps.iter().zip(&a.ft_lr) {
            let name = format!("FT {steps} step{}", if steps == 1 { "" } else { "s" });
            ft.push((name.clone(), steps, lr));
            methods.push((name, Editor::new(&bundle, backend.as_ref(), 0)?));
        }
    }
    for (name, editor) in &mut methods {
        for &n in &a.edits {
            let draws = (a.min_edits / n).max(1);
            let (mut sum, mut secs) = (EditScores::default(), 0.0);
            for k in 0..draws {
                let reqs = editor.world.edit_requests(
                    Split::Eval,
                    n,
                    editor.meta.unrelated,
                    a.seed.wrapping_mul(1_000_003) + (n as u64) * 7919 + k as u64,
                )?;
                editor.reset();
                let t0 = Instant::now();
                let applied = if let Some((_, steps, lr)) = ft.iter().find(|f| &f.0 == name) {
                    editor.fine_tune(&reqs, *steps, *lr)?
                } else {
                    editor.edit(&reqs, false)?
                };
                secs += t0.elapsed().as_secs_f64();
                let s = editor.measure(&reqs)?;
                editor.undo(applied)?;
                sum.es += s.es;
                sum.gs += s.gs;
                sum.ls += s.ls;
            }
            let d = draws as f64;
            let row = Row {
                method: name.clone(),
                edits: n,
                draws,
                scores: EditScores {
                    es: sum.es / d,
                    gs: sum.gs / d,
                    ls: sum.ls / d,
                },
                seconds: secs / d,
            };
            eprintln!(
                "{:<16} {:>5} edits ({} draws): {}  {:.3}s",
                row.method,
                n,
                draws,
                row.scores.show(),
                row.seconds
            );
            rows.push(row);
        }
    }
    std::fs::create_dir_all(&a.out)?;
    write_atomic(
        &a.out.join("scale.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    let mut md = String::from(
        "| method | edits | ES | GS | LS | seconds per edit call |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.method, r.edits, r.scores.es, r.scores.gs, r.scores.ls, r.seconds
        );
    }
    write_atomic(&a.out.join("scale.md"), md.as_bytes())?;
    let mut names: Vec<&str> = vec![];
    for r in &rows {
        if !names.contains(&r.method.as_str()) {
            names.push(&r.method);
        }
    }
    let mut series = vec![];
    for name in names {
        for (m, get) in [
            ("ES", (|s: &EditScores| s.es) as fn(&EditScores) -> f64),
            ("LS", |s| s.ls),
        ] {
            let pts = rows
                .iter()
                .filter(|r| r.method == name)
                .map(|r| ((r.edits as f64).log2(), get(&r.scores)))
                .collect();
            series.push((format!("{name} {m}"), pts));
        }
    }
    plot_curves_with(
        &a.out.join("scale.png"),
        "ES and LS against simultaneous edits (evaluation facts; GS follows ES)",
        &series,
        &PlotOptions {
            log_y: false,
            x_label: "log2(simultaneous edits)".into(),
            y_label: "accuracy".into(),
            ..PlotOptions::default()
        },
    )?;
    print!("{md}");
    Ok(())
}
