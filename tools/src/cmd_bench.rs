//! `metac bench`: measured throughput of compiled graphs on this machine,
//! always next to a reference run in the same process.

use std::time::Instant;

use anyhow::Result;
use metac_compiler::models::mlp::{Activation, Mlp};
use metac_graphs::autodiff::{grad, hvp_forward_over_reverse};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions, Session};
use metac_runtime::data::mnist;
use metac_runtime::tensor::HostTensor;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

use crate::common::BackendArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metac bench mlp                       # ORT and tract, 55,000 MNIST examples\n  metac bench mlp --examples 10000 --repeats 20 --backends ort"
)]
pub struct Args {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(clap::Subcommand)]
pub enum Which {
    /// Value-and-gradient and HVP of the MNIST MLP 784-20-10 over the training set,
    /// against a plain 784x20 MatMul on the same rows.
    Mlp(MlpArgs),
    /// One L2O meta-iteration (unroll + BPTT) of a config's compiled bundle: time per
    /// meta-iteration and per inner step, FLOPs, GFLOP/s, peak memory.
    L2o(crate::bench_l2o::L2oArgs),
}

#[derive(clap::Args)]
pub struct MlpArgs {
    /// Number of MNIST training examples per evaluation.
    #[arg(long, default_value_t = 55_000)]
    pub examples: usize,
    /// Timed runs per graph (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Comma-separated backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "ort,tract")]
    pub backends: Vec<BackendChoice>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// MNIST directory (IDX files).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    match a.which {
        Which::Mlp(m) => mlp(m),
        Which::L2o(l) => crate::bench_l2o::run(l),
    }
}

struct Case {
    name: &'static str,
    graph: Graph,
}

fn mlp_cases(n: usize) -> Vec<Case> {
    let mlp = Mlp::new(&[784, 20, 10], Activation::Sigmoid);
    let base = |g: &mut Graph| {
        let x = g.input("x", DType::F32, &[n, 784]);
        let y = g.input("y", DType::I64, &[n]);
        let p = mlp.params(g);
        let l = mlp.loss(g, &p, x, y);
        (p, l)
    };
    let mut reference = Graph::new();
    let x = reference.input("x", DType::F32, &[n, 784]);
    let w = reference.input("w0", DType::F32, &[784, 20]);
    let z = reference.matmul(x, w);
    reference.output("z", z);

    let mut vg = Graph::new();
    let (p, l) = base(&mut vg);
    let gs = grad(&mut vg, l, &p);
    vg.output("loss", l);
    for (i, gid) in gs.into_iter().enumerate() {
        vg.output(&format!("grad{i}"), gid);
    }

    let mut hv = Graph::new();
    let (p, l) = base(&mut hv);
    let vs: Vec<_> = p
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let s = hv.shape(id).to_vec();
            hv.input(&format!("v{i}"), DType::F32, &s)
        })
        .collect();
    let hs = hvp_forward_over_reverse(&mut hv, l, &p, &vs);
    for (i, h) in hs.into_iter().enumerate() {
        hv.output(&format!("hvp{i}"), h);
    }
    vec![
        Case {
            name: "reference: x[N,784] @ W[784,20]",
            graph: optimize(&reference),
        },
        Case {
            name: "value and gradient",
            graph: optimize(&vg),
        },
        Case {
            name: "HVP (forward-over-reverse)",
            graph: optimize(&hv),
        },
    ]
}

fn inputs_for(
    g: &Graph,
    x: &HostTensor,
    y: &HostTensor,
    rng: &mut impl Rng,
) -> Vec<(String, HostTensor)> {
    g.inputs()
        .into_iter()
        .map(|(name, id)| {
            let t = match name.as_str() {
                "x" => x.clone(),
                "y" => y.clone(),
                _ => {
                    let s = g.shape(id).to_vec();
                    let n: usize = s.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1..0.1)).collect();
                    HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&s), v).unwrap())
                }
            };
            (name, t)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_session(
    s: &mut dyn Session,
    inputs: &[(String, HostTensor)],
    repeats: usize,
) -> Result<f64> {
    let refs: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run(&refs)?;
    let mut times = vec![];
    for _ in 0..repeats {
        let t0 = Instant::now();
        s.run(&refs)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn mlp(a: MlpArgs) -> Result<()> {
    let dir = a.data_dir.clone().unwrap_or_else(mnist::default_dir);
    let data = mnist::load(&dir)?;
    let n = a.examples.min(data.train.len());
    let x = HostTensor::F32(ArrayD::from_shape_vec(
        IxDyn(&[n, 784]),
        data.train.images_f32(n),
    )?);
    let y = HostTensor::I64(ArrayD::from_shape_vec(
        IxDyn(&[n]),
        data.train.labels[..n].to_vec(),
    )?);
    let cases = mlp_cases(n);
    let threads = a
        .backend
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |p| p.get()));
    println!(
        "# metac bench mlp: MNIST MLP 784-20-10 (sigmoid, softmax cross-entropy), N = {n} examples"
    );
    println!("# median of {} runs after one warm-up; ORT with {threads} intra-op threads, tract single-threaded\n", a.repeats);
    println!("| backend | graph | nodes | GFLOP | time (ms) | GFLOP/s | vs reference GFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for choice in &a.backends {
        let opts = BackendOptions {
            choice: *choice,
            ..a.backend.options()
        };
        let backend = match open_backend(&opts) {
            Ok(b) => b,
            Err(e) => {
                println!("| {choice} | unavailable: {e:#} | | | | | |");
                continue;
            }
        };
        let mut ref_rate = None;
        for c in &cases {
            let bytes = metac_graphs::onnx::export_bytes(&c.graph, "bench")?;
            let mut s = backend.load(&bytes, c.name)?;
            let inputs = inputs_for(&c.graph, &x, &y, &mut rng);
            let t = time_session(s.as_mut(), &inputs, a.repeats)?;
            let gf = metac_graphs::cost::flops(&c.graph) as f64 / 1e9;
            let rate = gf / t;
            let rel = match ref_rate {
                None => {
                    ref_rate = Some(rate);
                    "1.00".to_string()
                }
                Some(r) => format!("{:.2}", rate / r),
            };
            println!(
                "| {} | {} | {} | {:.3} | {:.2} | {:.1} | {} |",
                backend.name(),
                c.name,
                c.graph.len(),
                gf,
                t * 1e3,
                rate,
                rel
            );
        }
    }
    Ok(())
}
