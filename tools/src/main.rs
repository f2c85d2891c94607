//! `metac`: ahead-of-time compiler and runtime for meta-learning training.

mod bench_l2o;
mod cmd_bench;
mod cmd_compare;
mod cmd_derive;
mod cmd_edit;
mod cmd_editor;
mod cmd_eval;
mod cmd_hessian;
mod cmd_inspect;
mod cmd_l2o;
mod cmd_lm;
mod cmd_moe;
mod common;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "metac",
    version,
    about = "Ahead-of-time compiler and runtime for meta-learning training",
    long_about = "metac traces models into static graphs with explicit gradient, Hessian-vector-product and \
meta-gradient subgraphs, writes them as standard ONNX in an artifact bundle, and runs bundles through \
ONNX Runtime (CPU or CUDA) or tract.",
    after_help = "Examples:\n  \
metac compile l2o --config configs/seed.toml --out bundles/seed\n  metac run bundles/seed --out runs/seed\n  metac eval runs/seed --bundle bundles/seed --problem mnist-mlp-relu --out evals/relu\n  metac derive model.onnx --loss loss --wrt l1.weight,l1.bias --out derived/\n  \
metac inspect derived/\n  \
metac inspect model.onnx\n  metac hessian --eval evals/relu --out hessian/\n  \
metac edit runs/editor --facts facts.jsonl --out edited/\n  metac eval edited/\n  metac compile moe --config configs/moe-short.toml --out bundles/moe\n  metac run bundles/moe --config configs/moe-short.toml --out runs/moe\n  metac sample runs/moe --prompt \"The \"\n  metac compare evals/relu=base evals/relu-hess=+hessian --out evals/ablation\n  metac bench mlp\n\n\
ONNX Runtime is loaded from ORT_DYLIB_PATH or from the installed Python package \
(pip install onnxruntime==1.31.1); without it metac falls back to tract."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Derive(cmd_derive::Args),
    Inspect(cmd_inspect::Args),
    /// Measure compiled graphs (mlp, l2o) against a reference run in the same process.
    Bench(cmd_bench::Args),
    /// Compile a program (l2o, lm, editor, moe) into a bundle.
    Compile(cmd_l2o::CompileArgs),
    /// Train a bundle: an L2O bundle's learned optimizer, an LM bundle's language model, an editor bundle's hypernetwork, a MoE bundle's byte-level LM.
    Run(cmd_l2o::RunArgs),
    /// Edit a language model's facts with a meta-trained editor (or fine-tuning) and write the edited model.
    Edit(cmd_edit::Args),
    /// Write edit requests of a fact world as a facts file (the input of `metac edit`).
    Facts(cmd_edit::FactsArgs),
    /// Generate text with a trained MoE (byte-level) language model: greedy or with a temperature.
    Sample(cmd_moe::SampleArgs),
    /// Meta-test a run's learned optimizer against baselines on a problem (MNIST or synthetic); or score an edited model (`metac eval EDITED`).
    Eval(cmd_eval::Args),
    /// Several `metac eval` outputs side by side (e.g. an ablation): one table, one plot.
    Compare(cmd_compare::Args),
    /// Hessian spectra (trace, top eigenvalues, density) of a problem's loss at given parameters.
    Hessian(cmd_hessian::Args),
}

/// Keeps large freed buffers in the heap instead of returning them to the
/// system. L2O meta-training draws a new 10,000-example objective set (two
/// 31 MB tensors) per unroll; with glibc's default those are fresh mappings
/// each time, and in a virtual machine touching their pages costs about as
/// much as a tenth of the unroll's compute.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_buffers() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_buffers() {}

fn main() -> ExitCode {
    keep_large_buffers();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // Usage errors are one line too, with the rest of clap's advice cut.
            let first = e
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .to_string();
            eprintln!("metac: error: {first} (see metac --help)");
            return ExitCode::from(2);
        }
    };
    let r = match cli.cmd {
        Cmd::Derive(a) => cmd_derive::run(a),
        Cmd::Inspect(a) => cmd_inspect::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Compile(a) => cmd_l2o::compile(a),
        Cmd::Run(a) => cmd_l2o::run(a),
        Cmd::Eval(a) => cmd_eval::run(a),
        Cmd::Edit(a) => cmd_edit::run(a),
        Cmd::Facts(a) => cmd_edit::facts(a),
        Cmd::Sample(a) => cmd_moe::sample(a),
        Cmd::Hessian(a) => cmd_hessian::run(a),
        Cmd::Compare(a) => cmd_compare::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("metac: error: {msg}");
            ExitCode::from(2)
        }
    }
}
