//! What several subcommands share: the backend options of those that run
//! graphs, a bundle's compile config, and reading an eval's summary.

use std::path::Path;

use anyhow::{Context, Result};
use metac_compiler::l2o::config::L2oConfig;
use metac_contract::bundle::Bundle;
use metac_contract::l2o::L2oMeta;
use metac_runtime::backend::{BackendChoice, BackendOptions, Device};

#[derive(clap::Args, Clone, Debug)]
pub struct BackendArgs {
    /// Execution engine: auto (ONNX Runtime if found, else tract), ort, tract.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Where graphs run: cpu or cuda:N (ONNX Runtime's CUDA execution provider).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// ONNX Runtime intra-op threads (default: all available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run every op as ONNX Runtime's own kernel: no fused elementwise
    /// chains or column-local kernels (on CPU they are fused by default).
    #[arg(long)]
    pub unfused: bool,
}

impl BackendArgs {
    pub fn options(&self) -> BackendOptions {
        BackendOptions {
            choice: self.backend,
            device: self.device,
            threads: self.threads,
            unfused: self.unfused,
        }
    }
}

/// The compile config stored in an L2O bundle (`meta.l2o.config`), for
/// `metac eval`, which rebuilds the learned optimizer on other problems.
pub fn bundle_config(b: &Bundle) -> Result<L2oConfig> {
    let meta =
        L2oMeta::from_manifest(&b.manifest).with_context(|| format!("{}", b.dir.display()))?;
    serde_json::from_value(meta.config)
        .with_context(|| format!("{}: malformed meta.l2o.config", b.dir.display()))
}

/// `DIR/summary.json` of an eval output, parsed as JSON; the error says
/// when DIR does not look like one.
pub(crate) fn read_summary_json(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read {} (is {} a `metac eval` output?)",
            p.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}
