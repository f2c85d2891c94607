//! `metac hessian --eval`: every parameter file of a `metac eval` output,
//! and a summary comparing them, per file and per optimizer over seeds.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use metac_contract::fsutil::write_atomic;
use metac_runtime::backend::Backend;
use metac_runtime::hessian::Settings;
use metac_runtime::metatest::Stat;
use serde_json::{json, Value};

use super::report::analyse_one;
use super::setup::{read_params, setup_problem};
use super::{Args, Split3};
use crate::common::read_summary_json;

/// Problem name and split of a `metac eval` directory.
fn eval_info(dir: &Path) -> Result<(String, Option<String>)> {
    let v = read_summary_json(dir)?;
    let problem = v["problem"]
        .as_str()
        .with_context(|| {
            format!(
                "{}: no string key \"problem\"",
                dir.join("summary.json").display()
            )
        })?
        .to_string();
    Ok((problem, v["split"].as_str().map(str::to_string)))
}

fn params_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let pdir = dir.join("params");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pdir)
        .with_context(|| format!("reading {}", pdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no .safetensors files",
        pdir.display()
    );
    Ok(files)
}

/// Analyses every `EVAL/params/*.safetensors`; writes `OUT/<stem>/` per file
/// and `OUT/summary.json`.
pub(super) fn run(a: &Args, eval: &Path, s: &Settings, backend: &dyn Backend) -> Result<()> {
    let bname = backend.name();
    let (problem, split) = eval_info(eval)?;
    let files = params_files(eval)?;
    let split = match (a.split, split) {
        (Some(s), _) => Some(s),
        (None, Some(s)) => Split3::parse(&s),
        (None, None) => None,
    };
    let mut setup = setup_problem(a, &problem, split, backend)?;
    eprintln!(
        "metac hessian: {problem}, {} parameter files from {}, {} parameters, {bname}",
        files.len(),
        eval.display(),
        setup.problem.num_params()
    );
    let mut rows = vec![];
    for f in &files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        eprintln!("[{stem}]");
        let label = format!("problem '{problem}'");
        let params = read_params(f, setup.problem.as_ref(), &label)?;
        let r = analyse_one(
            &mut setup,
            params,
            json!({ "file": f.display().to_string() }),
            s,
            &a.out.join(&stem),
            bname,
        )?;
        rows.push(json!({
            "file": stem,
            "loss": r["loss"],
            "grad_norm": r["grad_norm"],
            "trace_mean": r["trace"]["mean"],
            "trace_stderr": r["trace"]["stderr"],
            "top_eigenvalue": r["top_eigenvalues"]["values"][0],
            "top_eigenvalues": r["top_eigenvalues"]["values"],
            "min_ritz_value": r["top_eigenvalues"]["min_value"],
        }));
    }
    let by_optimizer = per_optimizer(&rows);
    let summary = json!({
        "problem": problem,
        "eval_dir": eval.display().to_string(),
        "num_params": setup.problem.num_params(),
        "data": setup.data,
        "settings": s,
        "files": rows,
        "optimizers": by_optimizer,
    });
    let p = a.out.join("summary.json");
    write_atomic(&p, serde_json::to_string_pretty(&summary)?.as_bytes())
        .with_context(|| format!("writing {}", p.display()))?;
    println!(
        "{:<32} {:>10} {:>12} {:>22} {:>12}",
        "file", "loss", "|grad|", "trace (± stderr)", "top eig"
    );
    for r in &rows {
        println!(
            "{:<32} {:>10.5} {:>12.4e} {:>22} {:>12.4}",
            r["file"].as_str().unwrap_or(""),
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["grad_norm"].as_f64().unwrap_or(f64::NAN),
            format!(
                "{:.3} ± {:.3}",
                r["trace_mean"].as_f64().unwrap_or(f64::NAN),
                r["trace_stderr"].as_f64().unwrap_or(f64::NAN)
            ),
            r["top_eigenvalue"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "\n{:<24} {:>6} {:>22} {:>22}",
        "optimizer", "files", "trace (mean ± std)", "top eig (mean ± std)"
    );
    let pm = |v: &Value| {
        format!(
            "{:.3} ± {:.3}",
            v["mean"].as_f64().unwrap_or(f64::NAN),
            v["std"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for o in &by_optimizer {
        println!(
            "{:<24} {:>6} {:>22} {:>22}",
            o["optimizer"].as_str().unwrap_or(""),
            o["files"].as_array().map_or(0, Vec::len),
            pm(&o["trace_mean"]),
            pm(&o["top_eigenvalue"]),
        );
    }
    println!("wrote {}", p.display());
    Ok(())
}

/// The optimizer of a params file stem `<optimizer>-seed<N>` (the stem
/// itself for other names).
fn optimizer_of(stem: &str) -> &str {
    match stem.rsplit_once("-seed") {
        Some((o, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => o,
        _ => stem,
    }
}

/// Per optimizer, in order of first appearance: its files and the mean and
/// (population) std over them of loss, gradient norm, trace and top
/// eigenvalue.
fn per_optimizer(rows: &[Value]) -> Vec<Value> {
    let mut names: Vec<&str> = vec![];
    for r in rows {
        let o = optimizer_of(r["file"].as_str().unwrap_or(""));
        if !names.contains(&o) {
            names.push(o);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mine: Vec<&Value> = rows
                .iter()
                .filter(|r| optimizer_of(r["file"].as_str().unwrap_or("")) == name)
                .collect();
            let stat = |key: &str| {
                let v: Vec<f64> = mine.iter().filter_map(|r| r[key].as_f64()).collect();
                json!(Stat::of(&v))
            };
            json!({
                "optimizer": name,
                "files": mine.iter().map(|r| r["file"].clone()).collect::<Vec<_>>(),
                "loss": stat("loss"),
                "grad_norm": stat("grad_norm"),
                "trace_mean": stat("trace_mean"),
                "top_eigenvalue": stat("top_eigenvalue"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_grouped_by_optimizer() {
        assert_eq!(optimizer_of("adam-1e-3-seed12"), "adam-1e-3");
        assert_eq!(optimizer_of("learned-seed6"), "learned");
        assert_eq!(optimizer_of("mine"), "mine");
        assert_eq!(optimizer_of("x-seedy"), "x-seedy");
        let row = |f: &str, t: f64| json!({"file": f, "loss": 1.0, "grad_norm": 0.5, "trace_mean": t, "top_eigenvalue": t / 10.0});
        let g = per_optimizer(&[
            row("learned-seed6", 2.0),
            row("adam-1e-3-seed6", 9.0),
            row("learned-seed12", 4.0),
        ]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0]["optimizer"], "learned");
        assert_eq!(g[0]["trace_mean"]["mean"], 3.0);
        assert_eq!(g[0]["trace_mean"]["std"], 1.0);
        assert_eq!(g[0]["trace_mean"]["n"], 2);
        assert_eq!(g[1]["files"], json!(["adam-1e-3-seed6"]));
    }
}
