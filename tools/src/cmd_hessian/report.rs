//! One analysis: the estimators at given parameters, written as
//! `hessian.json` and `density.png`.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_contract::fsutil::write_atomic;
use metac_runtime::hessian::{analyze, Settings};
use metac_runtime::plot::plot_density;
use metac_runtime::tensor::HostTensor;
use serde_json::{json, Value};

use super::setup::Setup;

/// The density plot's floor, relative to its peak.
const PLOT_FLOOR: f64 = 1e-8;

/// Analyses the operator at `params`; writes `dir/hessian.json` and
/// `dir/density.png`; returns the JSON.
pub(super) fn analyse_one(
    setup: &mut Setup,
    params: Vec<HostTensor>,
    source: Value,
    s: &Settings,
    dir: &Path,
    backend: &str,
) -> Result<Value> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    setup.operator.set_params(params)?;
    let runs0 = setup.operator.graph_runs();
    let (loss, grad_norm) = setup.operator.loss_and_grad_norm()?;
    ensure!(
        loss.is_finite(),
        "the loss at these parameters is not finite ({loss})"
    );
    let a = analyze(&mut setup.operator, s, &mut |m| eprintln!("  {m}"))?;
    let n = setup.problem.num_params();
    let report = json!({
        "problem": setup.label,
        "params": source,
        "num_params": n,
        "data": setup.data,
        "backend": backend,
        "settings": s,
        "lanczos_steps_taken": a.top.steps,
        "loss": loss,
        "grad_norm": grad_norm,
        "trace": a.trace,
        "top_eigenvalues": a.top,
        "slq": a.slq,
        "density": a.density,
        "hvps": a.hvps,
        "graph_runs": setup.operator.graph_runs() - runs0,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let path = dir.join("hessian.json");
    write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let png = dir.join("density.png");
    let pts: Vec<(f64, f64)> = a
        .density
        .grid
        .iter()
        .copied()
        .zip(a.density.density.iter().copied())
        .collect();
    if let Err(e) = plot_density(
        &png,
        &format!("{}: Hessian spectral density (SLQ)", setup.label),
        &[("density".into(), pts)],
        PLOT_FLOOR,
    ) {
        eprintln!("metac hessian: warning: no plot written: {e:#}");
    }
    let se = a
        .trace
        .stderr
        .map(|x| format!(" ± {x:.4}"))
        .unwrap_or_default();
    println!(
        "{}: loss {loss:.5}, |grad| {grad_norm:.4e}, trace {:.4}{se}, top eigenvalues [{}], min Ritz value {:.4} ({} HVPs, {:.1}s)",
        dir.display(),
        a.trace.mean,
        a.top
            .values
            .iter()
            .map(|v| format!("{v:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
        a.top.min_value,
        a.hvps,
        t0.elapsed().as_secs_f64()
    );
    Ok(report)
}
