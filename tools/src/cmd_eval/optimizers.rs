//! The optimizers and seeds of `metac eval`: parsing `--optimizers` and
//! `--seeds`, and loading the learned optimizer of a run.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use metac_compiler::models::baselines::{parse_baseline, Baseline};
use metac_contract::bundle::Bundle;
use metac_contract::l2o::L2oMeta;
use metac_runtime::l2o::run::load_run_phi;

/// The optimizers run when `--optimizers` is not given.
pub const DEFAULT_OPTIMIZERS: &str =
    "learned,adam-1e-3,adam-1e-4,sgd-1e-3,rmsprop-1e-3,adagrad-1e-2";

/// Which meta-parameters of the run to use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhiChoice {
    /// best.safetensors (best validation objective), else the last checkpoint.
    Best,
    /// checkpoint.safetensors (the last meta-iteration).
    Last,
}

/// One requested optimizer: its label and what to build.
#[derive(Clone, Debug, PartialEq)]
pub enum OptSpec {
    Learned,
    Baseline(String, Baseline),
}

impl OptSpec {
    pub fn label(&self) -> &str {
        match self {
            OptSpec::Learned => "learned",
            OptSpec::Baseline(l, _) => l,
        }
    }
}

/// Parses `learned` or `NAME-LR` (e.g. `adam-1e-3`).
pub fn parse_optimizer(s: &str) -> Result<OptSpec> {
    let s = s.trim();
    if s == "learned" {
        return Ok(OptSpec::Learned);
    }
    let b = parse_baseline(s).map_err(anyhow::Error::msg)?;
    Ok(OptSpec::Baseline(s.to_string(), b))
}

/// Parses a comma-separated optimizer list (no duplicates, not empty).
pub fn parse_optimizers(s: &str) -> Result<Vec<OptSpec>> {
    let mut out: Vec<OptSpec> = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let o = parse_optimizer(part)?;
        ensure!(
            !out.iter().any(|p| p.label() == o.label()),
            "optimizer '{part}' is listed twice"
        );
        out.push(o);
    }
    ensure!(!out.is_empty(), "--optimizers lists no optimizer");
    Ok(out)
}

/// Parses a comma-separated seed list (no duplicates, not empty).
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = vec![];
    for part in s.split(',').map(str::trim) {
        let v: u64 = part.parse().map_err(|_| {
            anyhow::anyhow!("malformed seed '{part}' in --seeds '{s}' (expected e.g. 6,12,18)")
        })?;
        ensure!(!out.contains(&v), "seed {v} is listed twice in --seeds");
        out.push(v);
    }
    Ok(out)
}

/// The learned optimizer's weights from the run, in the bundle's `phi`
/// order (`meta.l2o.layout.phi`), each checked against the shape of the
/// bundle's initial value.
pub fn load_learned(
    run: Option<&Path>,
    bundle: Option<&Bundle>,
    phi: PhiChoice,
) -> Result<Vec<(String, metac_graphs::Tensor)>> {
    let run = run.context("the optimizer 'learned' needs a run directory (metac eval RUN --bundle BUNDLE ...); leave it out of --optimizers to run baselines only")?;
    let bundle = bundle.context(
        "the optimizer 'learned' needs --bundle BUNDLE (the bundle the run meta-trained)",
    )?;
    let meta = L2oMeta::from_manifest(&bundle.manifest)
        .with_context(|| format!("{}", bundle.dir.display()))?;
    let mut loaded = load_run_phi(run, phi == PhiChoice::Best)?;
    let mut ordered = Vec::with_capacity(meta.layout.phi.len());
    for name in &meta.layout.phi {
        let shape = &bundle
            .init
            .get(name)
            .with_context(|| format!("{}: no initial value of '{name}'", bundle.dir.display()))?
            .shape;
        let i = loaded
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| {
                format!(
                    "{}: the run's meta-parameters have no '{name}' (does the run belong to bundle {}?)",
                    run.display(),
                    bundle.dir.display()
                )
            })?;
        let (n, t) = loaded.swap_remove(i);
        ensure!(
            &t.shape == shape,
            "{}: meta-parameter '{n}' has shape {:?}, the bundle's optimizer expects {shape:?}",
            run.display(),
            t.shape
        );
        ordered.push((n, t));
    }
    if let Some((n, _)) = loaded.first() {
        bail!(
            "{}: meta-parameter '{n}' is unknown to the bundle's optimizer (does the run belong to bundle {}?)",
            run.display(),
            bundle.dir.display()
        );
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_names_parse() {
        assert_eq!(parse_optimizer("learned").unwrap(), OptSpec::Learned);
        match parse_optimizer("adam-1e-3").unwrap() {
            OptSpec::Baseline(l, Baseline::Adam(a)) => {
                assert_eq!(l, "adam-1e-3");
                assert_eq!(a.lr, 1e-3);
            }
            o => panic!("{o:?}"),
        }
        match parse_optimizer("adagrad-0.01").unwrap() {
            OptSpec::Baseline(_, Baseline::Adagrad(a)) => assert_eq!(a.lr, 0.01),
            o => panic!("{o:?}"),
        }
        for bad in [
            "adam",
            "adam-x",
            "nope-1e-3",
            "sgd--1",
            "sgd-0",
            "sgd-inf",
            "",
        ] {
            assert!(parse_optimizer(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_optimizers(DEFAULT_OPTIMIZERS).unwrap().len(), 6);
        assert!(parse_optimizers("adam-1e-3,adam-1e-3").is_err());
        assert!(parse_optimizers(",").is_err());
    }

    #[test]
    fn seeds_parse() {
        assert_eq!(parse_seeds("6, 12,18").unwrap(), vec![6, 12, 18]);
        for bad in ["", "1,,2", "a", "1,1", "-1"] {
            assert!(parse_seeds(bad).is_err(), "{bad}");
        }
    }
}
