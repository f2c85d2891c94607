//! `metac bench l2o`: the cost of one meta-iteration of a compiled L2O
//! bundle (one unroll forward through `step`, BPTT through `step_vjp`),
//! per inner step, with FLOPs, achieved GFLOP/s and peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use metac_compiler::l2o::config::L2oConfig;
use metac_compiler::l2o::program::{compile_l2o, L2oProgram};
use metac_contract::bundle::Bundle;
use metac_contract::l2o::{L2oMeta, RegularizeTime};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::data::mnist;
use metac_runtime::l2o::bptt::{truncated_bptt, Minibatches, Named, Role, StepRunner, Unroll};
use metac_runtime::l2o::data::{named_rows, xy_names, RowBatches};
use metac_runtime::l2o::regularizer::ProbeGenerator;
use metac_runtime::l2o::SessionRunner;
use metac_runtime::tensor::HostTensor;

use crate::common::BackendArgs;

#[derive(clap::Args)]
pub struct L2oArgs {
    /// The L2O config to compile and measure.
    #[arg(long, default_value = "configs/seed.toml")]
    pub config: PathBuf,
    /// Inner steps per unroll.
    #[arg(long, default_value_t = 20)]
    pub unroll_length: usize,
    /// Timed meta-iterations per backend (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Comma-separated backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "ort,tract")]
    pub backends: Vec<BackendChoice>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// MNIST directory (IDX files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Measure with this regulariser instead of the config's (none, hessian,
    /// hessian-ev, hessian-esd, jacob), counted in every unroll.
    #[arg(long)]
    pub reg_option: Option<String>,
    /// BPTT keeps the state of every N-th step and recomputes the rest
    /// (0: keeps all): memory against time.
    #[arg(long, default_value_t = 0)]
    pub bptt_checkpoint_every: usize,
}

fn conv(v: Vec<(String, metac_graphs::Tensor)>) -> Named<HostTensor> {
    v.into_iter()
        .map(|(n, t)| (n, HostTensor::from_graph(&t)))
        .collect()
}

/// Rows `rows` of the split (wrapping around) under a layout's `*.x`/`*.y` names.
fn xy(
    names: &[String],
    split: &mnist::Split,
    rows: std::ops::Range<usize>,
) -> Result<Named<HostTensor>> {
    let n = split.len();
    Ok(named_rows(
        split,
        rows.map(|i| i % n),
        &xy_names(names, "bench inputs")?,
    ))
}

/// Peak resident memory of this process so far (Linux), in MB.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A [`StepRunner`] that adds up the time spent inside each graph, so the
/// bench can say how much of a meta-iteration is the engine and how much is
/// the host (data, copies, BPTT bookkeeping).
struct Timed<R> {
    inner: R,
    step: f64,
    step_vjp: f64,
    objective: f64,
    reset: f64,
}

impl<R: StepRunner> Timed<R> {
    fn new(inner: R) -> Self {
        Timed {
            inner,
            step: 0.0,
            step_vjp: 0.0,
            objective: 0.0,
            reset: 0.0,
        }
    }
    fn clear(&mut self) {
        (self.step, self.step_vjp, self.objective, self.reset) = (0.0, 0.0, 0.0, 0.0);
    }
}

fn timed<T>(acc: &mut f64, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let out = f();
    *acc += t0.elapsed().as_secs_f64();
    out
}

impl<R: StepRunner> StepRunner for Timed<R> {
    type Tensor = R::Tensor;
    fn run(&mut self, role: Role, inputs: &[(&str, &R::Tensor)]) -> Result<Named<R::Tensor>> {
        let acc = match role {
            Role::Step => &mut self.step,
            Role::StepVjp => &mut self.step_vjp,
            Role::ObjectiveChunk => &mut self.objective,
            Role::Reset | Role::ResetVjp => &mut self.reset,
        };
        timed(acc, || self.inner.run(role, inputs))
    }
    fn set_regularized(&mut self, measure: bool, differentiate: bool) {
        self.inner.set_regularized(measure, differentiate)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn run(a: L2oArgs) -> Result<()> {
    let mut cfg = L2oConfig::load(&a.config)?;
    if let Some(r) = &a.reg_option {
        cfg.regularizer.reg_option = serde_json::from_value(serde_json::json!(r))
            .map_err(|_| anyhow::anyhow!("--reg-option: unknown regulariser '{r}' (none, hessian, hessian-ev, hessian-esd, jacob)"))?;
        cfg.regularizer.regularize_time = Some(RegularizeTime::All);
    }
    let program = L2oProgram::from_config(&cfg)?;
    let flops_step = metac_graphs::cost::flops(&program.step_graph()) as f64;
    let flops_vjp = metac_graphs::cost::flops(&program.step_vjp_graph()) as f64;
    // The objective of each step, measured `objective_chunk` steps per run.
    let flops_obj = metac_graphs::cost::flops(&program.objective_chunk_graph()) as f64
        / program.objective_chunk as f64;
    let per_iter = a.unroll_length as f64 * (flops_step + flops_obj + flops_vjp);
    let dir = std::env::temp_dir().join(format!("metac-bench-l2o-{}", std::process::id()));
    compile_l2o(&cfg, &dir)?;
    let bundle = Bundle::load(&dir)?;
    let meta = L2oMeta::from_manifest(&bundle.manifest)?;
    let (layout, reg) = (meta.layout, meta.regularizer);
    let mut gen = ProbeGenerator::new(cfg.seed);
    let probes: Vec<Named<HostTensor>> = match &reg {
        Some(r) => (0..a.unroll_length).map(|_| gen.draw(r)).collect(),
        None => vec![],
    };
    let data = mnist::load(&a.data_dir.clone().unwrap_or_else(mnist::default_dir))?;
    let phi = conv(program.init_phi(cfg.seed));
    let theta = conv(program.init_theta(cfg.seed));
    let state = conv(program.init_state(cfg.seed));
    // Gathered when a step needs them, as `metac run` does.
    let n_train = data.train.len();
    let minibatches = RowBatches {
        split: &data.train,
        names: xy_names(&layout.batch, "bench inputs")?,
        rows: (0..a.unroll_length)
            .map(|t| {
                (t * cfg.batch_size..(t + 1) * cfg.batch_size)
                    .map(|i| i % n_train)
                    .collect()
            })
            .collect(),
    };
    let first_minibatch = minibatches.get(0)?.into_owned();
    let obj = xy(
        &layout.objective_batch,
        &data.train,
        0..cfg.objective_examples,
    )?;
    // A row-major objective's transpose (`obj.x.T`, where the layout lists
    // it) is made by each timed BPTT call, once per unroll, as for an
    // objective set handed over without it.
    println!(
        "# metac bench l2o: {} (batch {}, objective set {}), regulariser {}, one meta-iteration = {}-step unroll + BPTT + meta-gradient",
        cfg.problem,
        cfg.batch_size,
        cfg.objective_examples,
        reg.as_ref().map_or("none", |r| r.option.as_str()),
        a.unroll_length
    );
    println!(
        "# FLOPs per inner step: step {:.3} GFLOP, objective {:.3} GFLOP, step_vjp {:.3} GFLOP; meta-iteration {:.2} GFLOP; median of {} after one warm-up\n",
        flops_step / 1e9,
        flops_obj / 1e9,
        flops_vjp / 1e9,
        per_iter / 1e9,
        a.repeats
    );
    println!("| backend | step forward (ms) | meta-iteration (s) | per inner step (ms) | in step (ms) | in objective (ms) | in step_vjp (ms) | GFLOP/s | peak RSS (MB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for choice in &a.backends {
        let backend = match open_backend(&BackendOptions {
            choice: *choice,
            ..a.backend.options()
        }) {
            Ok(b) => b,
            Err(e) => {
                println!("| {choice} | unavailable: {e:#} | | | | | | | |");
                continue;
            }
        };
        let mut runner = Timed::new(SessionRunner::from_bundle(&bundle, backend.as_ref())?);
        let unroll = Unroll {
            phi: &phi,
            theta: &theta,
            state: &state,
            reset: true,
            minibatches: &minibatches,
            objective_batch: &obj,
            initial_objective: 2.3,
            probes: &probes,
            reg_weight: reg.as_ref().map_or(0.0, |r| r.alpha),
            imitation: None,
            checkpoint_every: a.bptt_checkpoint_every,
        };
        let mut fwd = vec![];
        let mut ins: Vec<(&str, &HostTensor)> = phi
            .iter()
            .chain(&theta)
            .chain(&state)
            .chain(&first_minibatch)
            .chain(probes.first().into_iter().flatten())
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        ins.sort_by_key(|(n, _)| *n);
        runner.run(Role::Step, &ins)?;
        for _ in 0..a.repeats {
            let t0 = Instant::now();
            runner.run(Role::Step, &ins)?;
            fwd.push(t0.elapsed().as_secs_f64());
        }
        truncated_bptt(&mut runner, &layout, &unroll)?;
        let (mut times, mut in_step, mut in_vjp, mut in_obj) = (vec![], vec![], vec![], vec![]);
        for _ in 0..a.repeats {
            runner.clear();
            let t0 = Instant::now();
            truncated_bptt(&mut runner, &layout, &unroll)?;
            times.push(t0.elapsed().as_secs_f64());
            in_step.push(runner.step);
            in_vjp.push(runner.step_vjp);
            in_obj.push(runner.objective);
        }
        let t = median(times);
        let per_step = |v: Vec<f64>| median(v) / a.unroll_length as f64 * 1e3;
        println!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            backend.name(),
            median(fwd) * 1e3,
            t,
            t / a.unroll_length as f64 * 1e3,
            per_step(in_step),
            per_step(in_obj),
            per_step(in_vjp),
            per_iter / t / 1e9,
            peak_rss_mb().map_or("n/a".into(), |m| format!("{m:.0}"))
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
