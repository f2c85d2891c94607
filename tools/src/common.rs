//! Options shared by the subcommands that run graphs.

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
