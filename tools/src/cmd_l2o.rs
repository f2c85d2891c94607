//! `metac compile l2o` and `metac run`: the learned-optimizer workload.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_compiler::l2o::config::L2oConfig;
use metac_compiler::l2o::program::compile_l2o;
use metac_contract::bundle::Bundle;
use metac_contract::l2o::{DataKind, L2oMeta, RunSettings, ValidationSplit};
use metac_runtime::backend::open_backend;
use metac_runtime::data::mnist;
use metac_runtime::l2o::run::L2oWorkload;
use metac_runtime::trainer::{Trainer, TrainerOptions};

use crate::common::BackendArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metac compile l2o --config configs/seed.toml --out bundles/seed\n  metac compile l2o --config configs/tiny.toml --out bundles/tiny\n  metac compile lm --config configs/lm.toml --out bundles/lm\n  metac compile editor --config configs/editor.toml --out bundles/editor\n  metac compile moe --config configs/moe.toml --out bundles/moe"
)]
pub struct CompileArgs {
    #[command(subcommand)]
    pub program: Program,
}

#[derive(clap::Subcommand)]
pub enum Program {
    /// The HierarchicalRNN learned optimizer: inner step, its VJP (the meta-gradient
    /// subgraph), the hidden-state reset and its VJP, and the objective.
    L2o {
        /// TOML config (see configs/seed.toml).
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// The MALMEN editor of a language model: the (u, delta) cache, the
    /// hypernetwork and its VJP, the meta-loss and its gradient, Adam.
    Editor {
        /// TOML config (see configs/editor.toml).
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A byte-level LM whose MLPs are mixtures of SwiGLU experts (Tiny-ONN):
    /// the two-backward hyper step (main gradient and per-token surprise,
    /// router loss, two Adams) as one graph, its evaluation and its logits.
    Moe {
        /// TOML config (see configs/moe.toml).
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A GPT-style language model on a seeded fact world: its training step
    /// (forward, gradient and Adam as one graph) and its evaluation.
    Lm {
        /// TOML config (see configs/lm.toml).
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn compile(a: CompileArgs) -> Result<()> {
    match a.program {
        Program::Lm { config, out } => crate::cmd_lm::compile(&config, &out),
        Program::Editor { config, out } => crate::cmd_editor::compile(&config, &out),
        Program::Moe { config, out } => crate::cmd_moe::compile(&config, &out),
        Program::L2o { config, out } => {
            let c = L2oConfig::load(&config)?;
            let t0 = Instant::now();
            let m = compile_l2o(&c, &out)?;
            let nodes: usize = m
                .graphs
                .iter()
                .map(|g| g.op_counts.values().sum::<usize>())
                .sum();
            println!(
                "wrote l2o bundle {} ({} graphs, {} ONNX nodes, {} state buffers) in {:.1}s",
                out.display(),
                m.graphs.len(),
                nodes,
                m.state.len(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Train a bundle: meta-train the learned optimizer of an L2O bundle, or
/// train the language model of an LM bundle.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
metac run bundles/seed --out runs/seed                       # the seed recipe: 100 meta-iterations x 5 unrolls of 20\n  \
metac run bundles/seed --out runs/long --meta-iterations 500 --num-unrolls 10\n  \
metac run bundles/seed --out runs/seed --resume               # continue a killed run\n  \
metac run bundles/lm --config configs/lm.toml --out runs/lm  # a language model, [run] epochs of its config\n  \
metac run bundles/editor --config configs/editor.toml --out runs/editor  # the MALMEN editor, [run] trajectories\n\n\
Writes RUN/metrics.jsonl (one line per meta-iteration), RUN/checkpoint.{safetensors,json} \
(written atomically after every meta-iteration) and RUN/best.safetensors (the meta-parameters \
with the best validation objective). Unroll length and counts are run-time settings: \
changing them recompiles nothing.")]
pub struct RunArgs {
    /// The bundle (from `metac compile l2o` or `metac compile lm`).
    pub bundle: PathBuf,
    /// Run directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Take the [run] settings from this config file (flags below override them).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// L2O: meta-iterations of the run.
    #[arg(long)]
    pub meta_iterations: Option<usize>,
    /// LM: epochs of the run (passes over the pretraining prompts).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// LM: seed of the initial parameters and of the prompts' order;
    /// editor: of the hypernetwork and the edit batches.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Editor: trajectories of the run.
    #[arg(long)]
    pub trajectories: Option<usize>,
    #[arg(long)]
    pub unroll_length: Option<usize>,
    #[arg(long)]
    pub num_unrolls: Option<usize>,
    /// Validate every N meta-iterations (LM: epochs) (0 = never).
    #[arg(long)]
    pub evaluation_period: Option<usize>,
    /// Fresh problems per validation; the validation objective is their mean
    /// (default 1).
    #[arg(long)]
    pub validation_problems: Option<usize>,
    /// Inner steps of a validation run (default: the meta-training horizon,
    /// unroll length x unrolls; 0 means that too).
    #[arg(long)]
    pub validation_steps: Option<usize>,
    /// MNIST split of the validation problems' minibatches: validation
    /// (5,000 examples) or train (55,000) [default: validation].
    #[arg(long, value_parser = ["validation", "train"])]
    pub validation_split: Option<String>,
    /// Curriculum learning: comma-separated inner steps per meta-iteration of
    /// each stage (e.g. 100,200,500,1000); replaces --num-unrolls.
    #[arg(long, value_delimiter = ',')]
    pub curriculum: Option<Vec<usize>>,
    /// Curriculum: validations at a stage before it may switch (default 3).
    #[arg(long)]
    pub min_num_eval: Option<usize>,
    /// BPTT keeps the state of every N-th step and recomputes the rest in the
    /// backward pass (0: keeps all); less memory for long unrolls, one more
    /// forward step per step.
    #[arg(long)]
    pub bptt_checkpoint_every: Option<usize>,
    /// MNIST directory (IDX files, gzip or raw); default: the shipped data/mnist.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// MoE: the text corpus, a text file or a folder of them (default: Debian's
    /// fortunes, /usr/share/games/fortunes; apt-get install fortunes).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// MoE: training steps of the run.
    #[arg(long)]
    pub steps: Option<usize>,
    /// No progress line per meta-iteration.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl RunArgs {
    /// Refuse the learned-optimizer flags for a bundle of another kind.
    pub fn reject_l2o_flags(&self, bundle: &Bundle, what: &str, its_flags: &str) -> Result<()> {
        for (flag, given) in [
            ("--meta-iterations", self.meta_iterations.is_some()),
            ("--unroll-length", self.unroll_length.is_some()),
            ("--num-unrolls", self.num_unrolls.is_some()),
            ("--validation-problems", self.validation_problems.is_some()),
            ("--validation-steps", self.validation_steps.is_some()),
            ("--validation-split", self.validation_split.is_some()),
            ("--curriculum", self.curriculum.is_some()),
            ("--min-num-eval", self.min_num_eval.is_some()),
            (
                "--bptt-checkpoint-every",
                self.bptt_checkpoint_every.is_some(),
            ),
            ("--data-dir", self.data_dir.is_some()),
        ] {
            ensure!(
                !given,
                "{flag} applies to learned-optimizer (l2o) bundles; {} is {what} bundle (its flags: {its_flags})",
                bundle.dir.display()
            );
        }
        Ok(())
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let bundle = Bundle::load(&a.bundle)?;
    if bundle.manifest.kind == metac_contract::moe::MOE_KIND {
        return crate::cmd_moe::run(a, bundle);
    }
    for (flag, given) in [("--data", a.data.is_some()), ("--steps", a.steps.is_some())] {
        ensure!(
            !given,
            "{flag} applies to mixture-of-experts (moe) bundles; {} is a '{}' bundle",
            bundle.dir.display(),
            bundle.manifest.kind
        );
    }
    if bundle.manifest.kind == metac_contract::lm::LM_KIND {
        return crate::cmd_lm::run(a, bundle);
    }
    if bundle.manifest.kind == metac_contract::editor::EDITOR_KIND {
        a.reject_l2o_flags(
            &bundle,
            "an editor",
            "--config, --trajectories, --seed, --evaluation-period",
        )?;
        ensure!(
            a.epochs.is_none(),
            "--epochs applies to language-model (lm) bundles; {} is an editor bundle",
            bundle.dir.display()
        );
        return crate::cmd_editor::run(a, bundle);
    }
    for (flag, given) in [
        ("--epochs", a.epochs.is_some()),
        ("--seed", a.seed.is_some()),
        ("--trajectories", a.trajectories.is_some()),
    ] {
        ensure!(
            !given,
            "{flag} applies to language-model (lm) bundles; {} is a '{}' bundle",
            bundle.dir.display(),
            bundle.manifest.kind
        );
    }
    let meta = L2oMeta::from_manifest(&bundle.manifest)
        .with_context(|| format!("{}", bundle.dir.display()))?;
    let mut rc = match &a.config {
        Some(p) => RunSettings::from_config_file(p)?,
        None => RunSettings::default(),
    };
    if let Some(v) = a.meta_iterations {
        rc.num_meta_iterations = v;
    }
    if let Some(v) = a.unroll_length {
        rc.unroll_length = v;
    }
    if let Some(v) = a.num_unrolls {
        rc.num_unrolls = v;
    }
    if let Some(v) = a.evaluation_period {
        rc.evaluation_period = v;
    }
    if let Some(v) = &a.curriculum {
        rc.curriculum = Some(v.clone());
    }
    if let Some(v) = a.min_num_eval {
        rc.min_num_eval = v;
    }
    if let Some(v) = a.validation_problems {
        rc.validation_problems = v;
    }
    if let Some(v) = a.validation_steps {
        rc.validation_steps = v;
    }
    if let Some(v) = &a.validation_split {
        rc.validation_split = if v == "train" {
            ValidationSplit::Train
        } else {
            ValidationSplit::Validation
        };
    }
    if let Some(v) = a.bptt_checkpoint_every {
        rc.bptt_checkpoint_every = v;
    }
    ensure!(rc.unroll_length > 0, "--unroll-length must be at least 1");
    ensure!(rc.num_unrolls > 0, "--num-unrolls must be at least 1");
    rc.validate()?;
    ensure!(
        meta.data == Some(DataKind::Mnist),
        "problem '{}' is not an MNIST problem; metac run meta-trains on MNIST problems",
        meta.problem
    );
    let dir = a.data_dir.clone().unwrap_or_else(mnist::default_dir);
    let data = mnist::load(&dir)?;
    let backend = open_backend(&a.backend.options())?;
    let settings = rc;
    let mut workload = L2oWorkload::new(
        &bundle,
        backend.as_ref(),
        settings.clone(),
        &data.train,
        match settings.validation_split {
            ValidationSplit::Validation => &data.validation,
            ValidationSplit::Train => &data.train,
        },
    )?;
    let identity = workload.manifest_sha256.clone();
    let mut trainer = Trainer::open(&mut workload, &a.out, &identity, a.resume)?;
    if !a.quiet {
        let horizon = match &settings.curriculum() {
            Some(c) => format!(
                "curriculum {:?} steps (stage {}, switching after {} validations)",
                c.steps,
                workload.curriculum_state().stage,
                c.min_num_eval
            ),
            None => format!("{} unrolls", settings.num_unrolls),
        };
        eprintln!(
            "metac run: {} on {} ({}), {} meta-iterations x {horizon} x {} steps, starting at {}",
            meta.problem,
            backend.name(),
            a.backend.device,
            settings.num_meta_iterations,
            settings.unroll_length,
            trainer.completed()
        );
    }
    let opts = TrainerOptions {
        iterations: settings.num_meta_iterations,
        evaluation_period: settings.evaluation_period,
        quiet: a.quiet,
    };
    trainer.run(&mut workload, opts, &mut |_| {})?;
    if workload.curriculum_state().stopped {
        println!(
            "curriculum: stage {} brought no improvement in {} validations; meta-training stopped after {} meta-iterations",
            workload.curriculum_state().stage,
            settings.min_num_eval,
            trainer.completed()
        );
    }
    println!(
        "meta-training done: {} meta-iterations in {}; metrics in {}",
        trainer.completed(),
        a.out.display(),
        a.out.join("metrics.jsonl").display()
    );
    Ok(())
}
