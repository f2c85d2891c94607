//! Meta-gradients by explicit step adjoints: truncated BPTT over the L2O
//! bundle's `step` / `step_vjp` / `reset` / `reset_vjp` graphs (evaluated
//! with the f64 reference interpreter) agrees with central finite
//! differences of the meta-loss and with reverse mode over the fused
//! whole-unroll graph, with and without second derivatives. Where ONNX
//! Runtime can be loaded, BPTT over the exported bundle agrees with the f64
//! result to f32 accuracy.

use std::collections::HashMap;

use metac_compiler::l2o::program::{L2oProgram, INITIAL_OBJECTIVE, META_LOSS, REG_WEIGHT};
use metac_compiler::l2o::regularizer::{RegOption, RegularizerSpec};
use metac_compiler::l2o::{compile_l2o, L2oConfig};
use metac_compiler::models::hrnn::{Hrnn, HrnnConfig};
use metac_compiler::models::mlp::{Activation, Mlp};
use metac_compiler::models::problems::{fan_in_normal_rules, Problem, SeededRng, SyntheticProblem};
use metac_compiler::models::synthetic::Synthetic;
use metac_contract::bundle::Bundle;
use metac_contract::init::TensorInit;
use metac_graphs::autodiff::grad;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
use metac_runtime::l2o::{
    meta_iteration, truncated_bptt, GraphRunner, MnistUnrollData, RmsProp, RmsPropConfig,
    SessionRunner, Unroll, UnrollData, UnrollSchedule,
};
use metac_runtime::tensor::HostTensor;

const STEPS: usize = 5;
const IN: usize = 3;

/// A 3-2-2 sigmoid MLP on random data: small enough for the interpreter.
struct TinyMlp {
    batch: usize,
}

impl TinyMlp {
    fn mlp() -> Mlp {
        Mlp::new(&[IN, 2, 2], Activation::Sigmoid)
    }
}

impl Problem for TinyMlp {
    fn name(&self) -> &str {
        "tiny-mlp"
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        Self::mlp().param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        Some(fan_in_normal_rules(&self.param_shapes(), &[IN, IN, 2, 2]))
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        vec![
            ("x".into(), DType::F32, vec![self.batch, IN]),
            ("y".into(), DType::I64, vec![self.batch]),
        ]
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        Self::mlp().loss(g, params, batch[0], batch[1])
    }
}

/// Learning rates around 1e-2 so that a 5-step unroll moves the optimizee.
fn hrnn() -> Hrnn {
    Hrnn::new(HrnnConfig {
        init_lr_range: (1e-2, 1e-1),
        ..HrnnConfig::default()
    })
}

/// Objectives measured two steps per `objective_chunk` run, so an unroll of
/// an odd length also runs a padded last chunk.
fn tiny_program(second: bool) -> L2oProgram {
    let mut p = L2oProgram::new(
        hrnn(),
        Box::new(TinyMlp { batch: 2 }),
        Box::new(TinyMlp { batch: 6 }),
        second,
    )
    .unwrap();
    p.objective_chunk = 2;
    p
}

fn quadratic_program(second: bool) -> L2oProgram {
    let p = || -> Box<dyn Problem> {
        Box::new(SyntheticProblem {
            name: "quadratic-3".into(),
            f: Synthetic::quadratic(3, 7),
        })
    };
    L2oProgram::new(hrnn(), p(), p(), second).unwrap()
}

fn values(ts: Vec<(String, Tensor)>) -> Vec<(String, Value)> {
    ts.into_iter()
        .map(|(n, t)| (n, Value::from_tensor(&t)))
        .collect()
}

/// A random batch under `prefix` for `problem`'s batch inputs.
fn batch(problem: &dyn Problem, prefix: &str, rng: &mut SeededRng) -> Vec<(String, Value)> {
    problem
        .batch_inputs()
        .into_iter()
        .map(|(n, d, s)| {
            let k: usize = s.iter().product();
            let t = match d {
                DType::F32 => Tensor::f32(&s, (0..k).map(|_| rng.normal() as f32).collect()),
                DType::I64 => Tensor::i64(&s, (0..k).map(|_| rng.below(2) as i64).collect()),
                DType::Bool => unreachable!(),
            };
            (format!("{prefix}{n}"), Value::from_tensor(&t))
        })
        .collect()
}

struct Case {
    prog: L2oProgram,
    phi: Vec<(String, Value)>,
    theta: Vec<(String, Value)>,
    state: Vec<(String, Value)>,
    minibatches: Vec<Vec<(String, Value)>>,
    obj: Vec<(String, Value)>,
    initial: f64,
    /// The regulariser's probes per step (empty without one) and its weight.
    probes: Vec<Vec<(String, Value)>>,
    reg_weight: f64,
}

fn case(prog: L2oProgram) -> Case {
    let mut rng = SeededRng::new(11, 0);
    let phi = values(prog.init_phi(3));
    let theta = values(prog.init_theta(4));
    let state = values(prog.init_state(5));
    let minibatches: Vec<_> = (0..STEPS)
        .map(|_| batch(prog.train.as_ref(), "batch.", &mut rng))
        .collect();
    let obj = batch(prog.objective.as_ref(), "obj.", &mut rng);
    let og = prog.objective_graph();
    let ins: HashMap<String, Value> = theta.iter().chain(&obj).cloned().collect();
    let out = eval_graph(&og, &ins).unwrap();
    let initial = out[0].1.f().iter().copied().next().unwrap();
    let probe_inputs = prog.probe_inputs();
    let probes = if probe_inputs.is_empty() {
        vec![]
    } else {
        (0..STEPS)
            .map(|_| {
                probe_inputs
                    .iter()
                    .map(|p| {
                        let k: usize = p.shape.iter().product();
                        let v = (0..k).map(|_| rng.normal() as f32).collect();
                        (
                            p.name.clone(),
                            Value::from_tensor(&Tensor::f32(&p.shape, v)),
                        )
                    })
                    .collect()
            })
            .collect()
    };
    let reg_weight = if prog.regularizer.option == RegOption::None {
        0.0
    } else {
        // Exact in f32, as the fused graph's input.
        0.25
    };
    Case {
        prog,
        probes,
        reg_weight,
        phi,
        theta,
        state,
        minibatches,
        obj,
        initial,
    }
}

impl Case {
    /// The case's unroll at `phi`: from its start, with a reset, its
    /// regulariser's probes and weight, no imitation, every state kept.
    fn unroll<'a>(&'a self, phi: &'a [(String, Value)]) -> Unroll<'a, Value> {
        Unroll {
            phi,
            theta: &self.theta,
            state: &self.state,
            reset: true,
            minibatches: &self.minibatches,
            objective_batch: &self.obj,
            initial_objective: self.initial,
            probes: &self.probes,
            reg_weight: self.reg_weight,
            imitation: None,
            checkpoint_every: 0,
        }
    }
}

fn runner(p: &L2oProgram) -> GraphRunner {
    GraphRunner::new(
        p.step_graph(),
        p.step_vjp_graph(),
        p.objective_chunk_graph(),
        p.reset_graph(),
        p.reset_vjp_graph(),
        p.unregularized_step_graphs(),
    )
}

/// Inputs of the fused graph.
fn fused_inputs(c: &Case, phi: &[(String, Value)]) -> HashMap<String, Value> {
    let mut m: HashMap<String, Value> = phi
        .iter()
        .chain(&c.theta)
        .chain(&c.state)
        .chain(&c.obj)
        .cloned()
        .collect();
    for (t, mb) in c.minibatches.iter().enumerate() {
        for (n, v) in mb {
            m.insert(format!("t{t}.{n}"), v.clone());
        }
    }
    for (t, pr) in c.probes.iter().enumerate() {
        for (n, v) in pr {
            m.insert(format!("t{t}.{n}"), v.clone());
        }
    }
    if c.prog.regularizer.option != RegOption::None {
        m.insert(
            REG_WEIGHT.into(),
            Value::from_tensor(&Tensor::scalar_f32(c.reg_weight as f32)),
        );
    }
    m.insert(
        INITIAL_OBJECTIVE.into(),
        Value::F(
            Value::from_tensor(&Tensor::scalar_f32(0.0))
                .f()
                .mapv(|_| c.initial),
        ),
    );
    m
}

fn flat(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n.max(1e-300)
}

/// BPTT vs fused reverse mode vs finite differences; returns the BPTT
/// meta-loss and meta-gradient.
fn check(c: &Case, reset: bool) -> (f64, Vec<(String, Value)>) {
    let layout = c.prog.layout();
    let mut r = runner(&c.prog);
    let res = truncated_bptt(
        &mut r,
        &layout,
        &Unroll {
            reset,
            ..c.unroll(&c.phi)
        },
    )
    .unwrap();
    assert!(!res.diverged);
    assert_eq!(res.objectives.len(), STEPS);
    assert!(res.objectives.iter().all(|o| o.is_finite()));

    // Fused reference: reverse mode over the whole unroll.
    let mut g = c.prog.fused_unroll_graph(STEPS, reset, false);
    let loss = g.find_output(META_LOSS).unwrap();
    let phi_ids: Vec<NodeId> = layout
        .phi
        .iter()
        .map(|n| g.find_input(n).unwrap())
        .collect();
    let grads = grad(&mut g, loss, &phi_ids);
    for (n, id) in layout.phi.iter().zip(grads) {
        g.output(&format!("d.{n}"), id);
    }
    let out: HashMap<String, Value> = eval_graph(&g, &fused_inputs(c, &c.phi))
        .unwrap()
        .into_iter()
        .collect();
    let fused_loss = out[META_LOSS].f().iter().copied().next().unwrap();
    let le = (fused_loss - res.meta_loss).abs() / fused_loss.abs();
    assert!(
        le < 1e-12,
        "meta-loss: BPTT {} vs fused {fused_loss}",
        res.meta_loss
    );

    let (mut all_b, mut all_f) = (vec![], vec![]);
    let mut worst = (0.0f64, String::new());
    for (n, d) in &res.d_phi {
        let (b, f) = (flat(d), flat(&out[&format!("d.{n}")]));
        let nf: f64 = f.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nf > 0.0 {
            let e = rel_err(&b, &f);
            if e > worst.0 {
                worst = (e, n.clone());
            }
        } else {
            assert!(
                b.iter().all(|x| *x == 0.0),
                "{n}: fused gradient 0, BPTT not"
            );
        }
        all_b.extend(b);
        all_f.extend(f);
    }
    let e = rel_err(&all_b, &all_f);
    println!(
        "reset={reset} second={}: meta-loss {:.6}, |d phi| {:.3e}, BPTT vs fused rel err {e:.2e} (worst tensor {} {:.2e})",
        c.prog.use_second_derivatives,
        res.meta_loss,
        all_f.iter().map(|x| x * x).sum::<f64>().sqrt(),
        worst.1,
        worst.0
    );
    assert!(e < 1e-5, "BPTT vs fused: rel err {e}");
    assert!(
        worst.0 < 1e-5,
        "BPTT vs fused: tensor {} rel err {}",
        worst.1,
        worst.0
    );

    // Central finite differences of the fused meta-loss on a few elements;
    // without second derivatives, of the frozen-gradient form (the
    // gradients of the unperturbed unroll as constants).
    let second = c.prog.use_second_derivatives;
    let fwd = {
        let mut f = c.prog.fused_unroll_graph(STEPS, reset, !second);
        let l = f.find_output(META_LOSS).unwrap();
        f.set_outputs(vec![(META_LOSS.into(), l)]);
        f
    };
    let frozen: Vec<(String, Value)> = out
        .iter()
        .filter(|(n, _)| n.contains(".grad."))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let eval_loss = |phi: &[(String, Value)]| -> f64 {
        let mut ins = fused_inputs(c, phi);
        if !second {
            ins.extend(frozen.iter().cloned());
        }
        let o = eval_graph(&fwd, &ins).unwrap();
        o[0].1.f().iter().copied().next().unwrap()
    };
    // The frozen form has the same value at the unperturbed point.
    let l0 = eval_loss(&c.phi);
    assert!(
        (l0 - fused_loss).abs() <= 1e-12 * fused_loss.abs(),
        "{l0} vs {fused_loss}"
    );
    let picks: &[(&str, usize)] = &[
        ("hrnn.update.w", 3),
        ("hrnn.shortcut.w", 1),
        ("hrnn.lr.w", 2),
        ("hrnn.param_stepsize_offset", 0),
        ("hrnn.l0.gates.w", 17),
        ("hrnn.l0.cand.w", 5),
        ("hrnn.init.l0", 4),
        ("hrnn.scl_decay.b", 0),
    ];
    let h = 1e-5;
    let max_abs = all_b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for &(name, i) in picks {
        let k = c.phi.iter().position(|(n, _)| n == name).unwrap();
        let shift = |dx: f64| {
            let mut p = c.phi.clone();
            if let Value::F(a) = &mut p[k].1 {
                *a.iter_mut().nth(i).unwrap() += dx;
            }
            p
        };
        let fd = (eval_loss(&shift(h)) - eval_loss(&shift(-h))) / (2.0 * h);
        let bp = flat(&res.d_phi.iter().find(|(n, _)| n == name).unwrap().1)[i];
        // Relative error, with a floor of 1e-3 of the largest meta-gradient
        // element for elements whose gradient is at the FD noise level.
        let scale = fd.abs().max(bp.abs()).max(1e-3 * max_abs);
        let err = (fd - bp).abs() / scale;
        println!("  {name}[{i}]: BPTT {bp:.9e}, FD {fd:.9e}, rel err {err:.1e}");
        if !reset && name.starts_with("hrnn.init") {
            assert_eq!(bp, 0.0, "without reset the init vectors get no gradient");
            continue;
        }
        assert!(
            err < 1e-5,
            "{name}[{i}]: BPTT {bp} vs FD {fd} (rel err {err})"
        );
    }
    (res.meta_loss, res.d_phi)
}

#[test]
fn bptt_matches_fused_and_finite_differences() {
    for second in [false, true] {
        let c = case(tiny_program(second));
        check(&c, true);
    }
    let c = case(tiny_program(false));
    check(&c, false);
}

/// Each regulariser enters the meta-loss and its meta-gradient (third-order
/// terms through theta_t) matches the fused graph and finite differences.
#[test]
fn regularised_meta_gradients_match_fused_and_finite_differences() {
    for (option, second) in [
        (RegOption::Hessian, false),
        (RegOption::HessianEv, false),
        (RegOption::HessianEsd, true),
        (RegOption::Jacob, false),
    ] {
        let mut prog = tiny_program(second);
        prog.regularizer = RegularizerSpec {
            option,
            num_probes: 2,
            power_iterations: 3,
            lanczos_steps: 3,
        };
        let c = case(prog);
        let plain = check(&case(tiny_program(second)), true).0;
        let (loss, _) = check(&c, true);
        println!("{option:?}: meta-loss {loss:.6} (without the regulariser {plain:.6})");
        assert!(
            (loss - plain).abs() > 1e-9,
            "{option:?}: the regulariser does not change the meta-loss"
        );
    }
}

#[test]
fn bptt_on_a_data_free_problem() {
    let c = case(quadratic_program(true));
    check(&c, true);
}

#[test]
fn second_derivatives_change_the_meta_gradient() {
    let a = check(&case(tiny_program(false)), true).1;
    let b = check(&case(tiny_program(true)), true).1;
    let (fa, fb): (Vec<f64>, Vec<f64>) = (
        a.iter().flat_map(|(_, v)| flat(v)).collect(),
        b.iter().flat_map(|(_, v)| flat(v)).collect(),
    );
    assert!(rel_err(&fa, &fb) > 1e-6, "the two meta-gradients coincide");
}

#[test]
fn divergence_stops_the_unroll() {
    let c = case(tiny_program(false));
    let mut phi = c.phi.clone();
    // A huge step size offset: the optimizee blows up at once.
    for (n, v) in phi.iter_mut() {
        if n == "hrnn.param_stepsize_offset" {
            *v = Value::from_tensor(&Tensor::scalar_f32(800.0));
        }
    }
    let layout = c.prog.layout();
    let res = truncated_bptt(&mut runner(&c.prog), &layout, &c.unroll(&phi)).unwrap();
    assert!(res.diverged);
    assert!(res.objectives.len() < STEPS);
    assert!(res.meta_loss.is_finite());
    assert!(res
        .d_phi
        .iter()
        .all(|(_, d)| d.f().iter().all(|x| x.is_finite())));
}

/// The tiny program with the Hutchinson regulariser (2 probes).
fn hutchinson_program() -> L2oProgram {
    let mut prog = tiny_program(false);
    prog.regularizer = RegularizerSpec {
        option: RegOption::Hessian,
        num_probes: 2,
        power_iterations: 1,
        lanczos_steps: 1,
    };
    prog
}

/// `prog`'s bundle in `dir` (seed 3, default meta-optimizer and settings).
fn write_test_bundle(prog: &L2oProgram, dir: &std::path::Path) -> metac_contract::bundle::Manifest {
    prog.write_bundle(
        3,
        serde_json::Value::Null,
        &Default::default(),
        &Default::default(),
        &Default::default(),
        dir,
    )
    .unwrap()
}

/// Named f32 tensors, flattened in order, as f64.
fn flat_f32(v: &[(String, HostTensor)]) -> Vec<f64> {
    v.iter()
        .flat_map(|(_, t)| {
            t.as_f32()
                .unwrap()
                .iter()
                .map(|&x| f64::from(x))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A case's data as f32 host tensors, for bundles run by a backend.
struct HostCase {
    phi: Vec<(String, HostTensor)>,
    theta: Vec<(String, HostTensor)>,
    state: Vec<(String, HostTensor)>,
    obj: Vec<(String, HostTensor)>,
    minibatches: Vec<Vec<(String, HostTensor)>>,
    probes: Vec<Vec<(String, HostTensor)>>,
    initial: f64,
}

impl HostCase {
    fn of(c: &Case) -> Self {
        HostCase {
            phi: to_host(&c.phi),
            theta: to_host(&c.theta),
            state: to_host(&c.state),
            obj: to_host(&c.obj),
            minibatches: c.minibatches.iter().map(|m| to_host(m)).collect(),
            probes: c.probes.iter().map(|p| to_host(p)).collect(),
            initial: c.initial,
        }
    }

    /// The unroll from the start, with a reset and every state kept.
    fn unroll(&self, reg_weight: f64) -> Unroll<'_, HostTensor> {
        Unroll {
            phi: &self.phi,
            theta: &self.theta,
            state: &self.state,
            reset: true,
            minibatches: &self.minibatches,
            objective_batch: &self.obj,
            initial_objective: self.initial,
            probes: &self.probes,
            reg_weight,
            imitation: None,
            checkpoint_every: 0,
        }
    }
}

fn to_host(v: &[(String, Value)]) -> Vec<(String, HostTensor)> {
    v.iter()
        .map(|(n, x)| {
            let t = match x {
                Value::F(a) => HostTensor::F32(a.mapv(|y| y as f32)),
                Value::I(a) => HostTensor::I64(a.clone()),
                Value::B(a) => HostTensor::Bool(a.clone()),
            };
            (n.clone(), t)
        })
        .collect()
}

#[test]
fn compiled_bundles_run_bptt_in_tract_and_onnx_runtime() {
    let dir = std::env::temp_dir().join(format!("metac-l2o-test-{}", std::process::id()));
    // The tiny config compiles (mnist-mlp, small batches) and loads back.
    let cfg = L2oConfig::load(&config_path("tiny.toml")).unwrap();
    let m = compile_l2o(&cfg, &dir.join("tiny")).unwrap();
    let names: Vec<&str> = m.graphs.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "step",
            "step_vjp",
            "reset",
            "reset_vjp",
            "objective",
            "objective_chunk",
            "meta_update",
            "metatest.learned",
            "baseline.adam-1e-3",
            "baseline.adam-1e-4",
            "baseline.sgd-1e-3",
            "baseline.rmsprop-1e-3",
            "baseline.adagrad-1e-2",
            "metatest.evaluate"
        ]
    );
    Bundle::load(&dir.join("tiny")).unwrap();
    let seed = L2oConfig::load(&config_path("seed.toml")).unwrap();
    assert_eq!(seed.run.unroll_length, 20);

    // BPTT over the exported tiny-MLP program in tract and ONNX Runtime
    // (f32) vs the f64 interpreter.
    let c = case(tiny_program(false));
    let bdir = dir.join("tiny-mlp");
    write_test_bundle(&c.prog, &bdir);
    let bundle = Bundle::load(&bdir).unwrap();
    let (ml, d64) = check(&c, true);
    let b: Vec<f64> = d64.iter().flat_map(|(_, v)| flat(v)).collect();
    let layout = c.prog.layout();
    let host = HostCase::of(&c);
    for choice in [BackendChoice::Tract, BackendChoice::Ort] {
        let backend = open_backend(&BackendOptions {
            choice,
            threads: Some(1),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{choice} (pip install -r requirements.txt): {e:#}"));
        let mut sr = SessionRunner::from_bundle(&bundle, backend.as_ref()).unwrap();
        let res = truncated_bptt(&mut sr, &layout, &host.unroll(0.0)).unwrap();
        let a = flat_f32(&res.d_phi);
        let e = rel_err(&a, &b);
        let le = (res.meta_loss - ml).abs() / ml.abs();
        println!(
            "{} f32 vs f64: meta-loss rel err {le:.2e}, meta-gradient rel err {e:.2e}",
            backend.name()
        );
        assert!(
            le < 1e-3 && e < 1e-3,
            "{choice} vs f64: meta-loss {le}, gradient {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn config_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name)
}

#[test]
fn compile_is_deterministic_and_ignores_the_run_table() {
    let dir = std::env::temp_dir().join(format!("metac-l2o-det-{}", std::process::id()));
    let cfg = L2oConfig::load(&config_path("tiny.toml")).unwrap();
    let mut other = cfg.clone();
    other.run.unroll_length = 3;
    other.run.num_meta_iterations = 9;
    let a = compile_l2o(&cfg, &dir.join("a")).unwrap();
    let b = compile_l2o(&other, &dir.join("b")).unwrap();
    assert_eq!(a, b);
    let read = |d: &str| std::fs::read(dir.join(d).join("manifest.json")).unwrap();
    assert_eq!(read("a"), read("b"));
    // Every theta and state buffer is fed back by the step; phi and its
    // accumulators by the meta-optimizer graph.
    let layout = metac_contract::l2o::L2oMeta::from_manifest(&a)
        .unwrap()
        .layout;
    for s in &a.state {
        let by_meta_update = layout.phi.contains(&s.name) || s.name.starts_with("ms.");
        let by = s.updated_by.as_ref().map(|p| p.graph.as_str());
        let want = if by_meta_update {
            "meta_update"
        } else {
            "step"
        };
        assert_eq!(by, Some(want), "{}", s.name);
        assert!(!s.reads.is_empty(), "{}", s.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The seed recipe's bundle (MNIST MLP, 10,000-example objective set).
#[test]
fn compile_seed_config() {
    let dir = std::env::temp_dir().join(format!("metac-l2o-seed-{}", std::process::id()));
    let cfg = L2oConfig::load(&config_path("seed.toml")).unwrap();
    let t = std::time::Instant::now();
    let m = compile_l2o(&cfg, &dir).unwrap();
    println!(
        "compiled the seed bundle in {:.1} s: {} graphs, {} state buffers",
        t.elapsed().as_secs_f64(),
        m.graphs.len(),
        m.state.len()
    );
    Bundle::load(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fixed data for every meta-iteration: the same minibatches and objective set.
struct FixedData {
    minibatches: Vec<Vec<(String, HostTensor)>>,
    obj: Vec<(String, HostTensor)>,
}

impl UnrollData<'_> for FixedData {
    fn minibatch(&mut self, step: usize) -> anyhow::Result<Vec<(String, HostTensor)>> {
        Ok(self.minibatches[step % self.minibatches.len()].clone())
    }
    fn objective_batch(&mut self, _unroll: usize) -> anyhow::Result<Vec<(String, HostTensor)>> {
        Ok(self.obj.clone())
    }
}

#[test]
fn meta_training_on_tract_lowers_the_meta_loss() {
    let dir = std::env::temp_dir().join(format!("metac-l2o-train-{}", std::process::id()));
    let c = case(tiny_program(false));
    write_test_bundle(&c.prog, &dir);
    let bundle = Bundle::load(&dir).unwrap();
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap();
    let mut sr = SessionRunner::from_bundle(&bundle, backend.as_ref()).unwrap();
    let layout = c.prog.layout();
    let mut phi = to_host(&c.phi);
    let phi0 = phi.clone();
    let mut opt = RmsProp::new(
        RmsPropConfig {
            lr: 1e-2,
            decay: 0.9,
            eps: 1e-8,
            clip: 1e4,
            accumulator_init: 0.0,
        },
        &phi,
    );
    let mut data = FixedData {
        minibatches: c.minibatches.iter().map(|m| to_host(m)).collect(),
        obj: to_host(&c.obj),
    };
    let schedule = UnrollSchedule {
        unroll_length: 3,
        num_unrolls: 2,
        checkpoint_every: 0,
    };
    let mut first = vec![];
    for _ in 0..6 {
        let rep = meta_iteration(
            &mut sr,
            &layout,
            &mut phi,
            &mut opt,
            to_host(&c.theta),
            to_host(&c.state),
            c.initial,
            schedule,
            &mut data,
            None,
            None,
        )
        .unwrap();
        assert!(!rep.diverged);
        assert_eq!(rep.meta_losses.len(), 2);
        assert_eq!(rep.objectives.len(), 6);
        assert!(rep.objectives.iter().all(|o| o.is_finite()));
        first.push(rep.meta_losses[0]);
    }
    println!("first-unroll meta-loss over meta-iterations: {first:?}");
    assert!(phi != phi0);
    assert!(
        first.last().unwrap() < first.first().unwrap(),
        "meta-loss did not fall: {first:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tiny config end to end on MNIST: compile, load, one meta-iteration
/// of the config's `[run]` schedule on the default backend (ONNX Runtime where
/// installed), on the shipped MNIST.
#[test]
fn tiny_config_meta_iteration_on_mnist() {
    let mdir = metac_runtime::data::mnist::default_dir();
    let mnist = metac_runtime::data::mnist::load(&mdir).unwrap();
    let dir = std::env::temp_dir().join(format!("metac-l2o-mnist-{}", std::process::id()));
    let cfg = L2oConfig::load(&config_path("tiny.toml")).unwrap();
    compile_l2o(&cfg, &dir).unwrap();
    let bundle = Bundle::load(&dir).unwrap();
    let layout = metac_contract::l2o::L2oMeta::from_manifest(&bundle.manifest)
        .unwrap()
        .layout;
    let backend = open_backend(&BackendOptions::default()).unwrap();
    let mut sr = SessionRunner::from_bundle(&bundle, backend.as_ref()).unwrap();
    let init = |names: &[String]| -> Vec<(String, HostTensor)> {
        names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    to_host(&values(vec![(n.clone(), bundle.init[n].clone())]))[0]
                        .1
                        .clone(),
                )
            })
            .collect()
    };
    let mut phi = init(&layout.phi);
    let (theta, state) = (init(&layout.theta), init(&layout.state));
    let mut data = MnistUnrollData::new(
        &mnist.train,
        cfg.batch_size,
        cfg.objective_examples,
        &layout.batch,
        &layout.objective_batch,
        &layout.objective_transposed,
        cfg.seed,
    )
    .unwrap();
    // The initial objective on the first unroll's objective set.
    let mut objective = backend
        .load(&bundle.graph_bytes("objective").unwrap(), "objective")
        .unwrap();
    // The set, and its transpose where `objective_chunk` reads one (the
    // `objective` graph does not).
    let obj0 = data.objective_batch(0).unwrap();
    let names = objective.input_names();
    let ins: Vec<(&str, &HostTensor)> = theta
        .iter()
        .chain(&obj0)
        .filter(|(n, _)| names.contains(n))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let out = objective.run(&ins).unwrap();
    let initial = f64::from(out[0].1.to_scalar_f32().unwrap());
    let mut opt = RmsProp::new(cfg.meta_optimizer.rmsprop(), &phi);
    let t = std::time::Instant::now();
    let rep = meta_iteration(
        &mut sr,
        &layout,
        &mut phi,
        &mut opt,
        theta,
        state,
        initial,
        UnrollSchedule {
            unroll_length: cfg.run.unroll_length,
            num_unrolls: cfg.run.num_unrolls,
            checkpoint_every: 0,
        },
        &mut data,
        None,
        None,
    )
    .unwrap();
    println!(
        "{}: initial objective {initial:.4}, meta-losses {:?}, last objective {:.4} ({:.1} s)",
        backend.name(),
        rep.meta_losses,
        rep.objectives.last().unwrap(),
        t.elapsed().as_secs_f64()
    );
    assert!(!rep.diverged);
    assert_eq!(
        rep.objectives.len(),
        cfg.run.unroll_length * cfg.run.num_unrolls
    );
    assert!(rep.meta_losses.iter().all(|m| m.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Imitation of Adam: the MSE against fixed labels enters the meta-loss, and
/// its host-side adjoint (through theta_t+1 and theta_t of every step) gives
/// the meta-gradient of the total, checked by central finite differences of
/// the BPTT meta-loss (second derivatives on, so that the finite differences
/// of the plain forward value are the reference).
#[test]
fn imitation_adjoint_matches_finite_differences() {
    let c = case(tiny_program(true));
    let layout = c.prog.layout();
    let mut rng = SeededRng::new(5, 1);
    let labels: Vec<Vec<(String, Value)>> = (0..STEPS)
        .map(|_| {
            c.theta
                .iter()
                .map(|(n, v)| {
                    let s = v.shape().to_vec();
                    let k: usize = s.iter().product();
                    let t = Tensor::f32(&s, (0..k).map(|_| 0.05 * rng.normal() as f32).collect());
                    (n.clone(), Value::from_tensor(&t))
                })
                .collect()
        })
        .collect();
    let weight = 2.0;
    let run = |phi: &[(String, Value)], imitate: bool| {
        truncated_bptt(
            &mut runner(&c.prog),
            &layout,
            &Unroll {
                imitation: imitate.then_some((labels.as_slice(), weight)),
                ..c.unroll(phi)
            },
        )
        .unwrap()
    };
    let res = run(&c.phi, true);
    let plain = run(&c.phi, false);
    assert_eq!(res.imitation_mse.len(), STEPS);
    let want = plain.meta_loss + weight * res.imitation_mse.iter().sum::<f64>() / STEPS as f64;
    assert!((res.meta_loss - want).abs() < 1e-12 * want.abs().max(1.0));
    let h = 1e-5;
    let max_abs = res
        .d_phi
        .iter()
        .flat_map(|(_, v)| flat(v))
        .fold(0.0f64, |m, x| m.max(x.abs()));
    for (name, i) in [
        ("hrnn.update.w", 3),
        ("hrnn.lr.w", 2),
        ("hrnn.param_stepsize_offset", 0),
        ("hrnn.l0.cand.w", 5),
        ("hrnn.init.l0", 4),
    ] {
        let k = c.phi.iter().position(|(n, _)| n == name).unwrap();
        let shift = |dx: f64| {
            let mut p = c.phi.clone();
            if let Value::F(a) = &mut p[k].1 {
                *a.iter_mut().nth(i).unwrap() += dx;
            }
            run(&p, true).meta_loss
        };
        let fd = (shift(h) - shift(-h)) / (2.0 * h);
        let bp = flat(&res.d_phi.iter().find(|(n, _)| n == name).unwrap().1)[i];
        let bp_plain = flat(&plain.d_phi.iter().find(|(n, _)| n == name).unwrap().1)[i];
        let err = (fd - bp).abs() / fd.abs().max(bp.abs()).max(1e-3 * max_abs);
        println!("  {name}[{i}]: BPTT {bp:.9e} (without imitation {bp_plain:.3e}), FD {fd:.9e}, rel err {err:.1e}");
        assert!(err < 1e-5, "{name}[{i}]: BPTT {bp} vs FD {fd}");
    }
}

/// The compiled meta-optimizer (`meta_update`) does what the host RMSProp
/// does, NaN, infinite and zero meta-gradient entries included.
#[test]
fn compiled_meta_update_matches_host_rmsprop() {
    use metac_compiler::l2o::config::MetaOptimizerConfig;
    use metac_runtime::l2o::{d_name, ms_name, next_name};
    let p = tiny_program(false);
    let m = MetaOptimizerConfig {
        lr: 0.1,
        decay: 0.9,
        eps: 1e-8,
        clip: 10.0,
        accumulator_init: 0.5,
    };
    let g = p.meta_update_graph(&m);
    let mut rng = SeededRng::new(9, 0);
    let phi: Vec<(String, Tensor)> = p.init_phi(1);
    let mut feeds: HashMap<String, Value> = HashMap::new();
    let mut host_phi = vec![];
    let mut host_d = vec![];
    for (k, (n, t)) in phi.iter().enumerate() {
        let len = t.shape.iter().product::<usize>();
        let d: Vec<f32> = (0..len)
            .map(|i| match (k + i) % 7 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => 0.0,
                3 => -1e3,
                _ => rng.normal() as f32,
            })
            .collect();
        let dt = Tensor::f32(&t.shape, d);
        feeds.insert(n.clone(), Value::from_tensor(t));
        feeds.insert(
            ms_name(n),
            Value::from_tensor(&Tensor::f32(&t.shape, vec![0.5; len])),
        );
        feeds.insert(d_name(n), Value::from_tensor(&dt));
        host_phi.push((
            n.clone(),
            to_host(&[(n.clone(), Value::from_tensor(t))]).remove(0).1,
        ));
        host_d.push((
            n.clone(),
            to_host(&[(n.clone(), Value::from_tensor(&dt))]).remove(0).1,
        ));
    }
    let out: HashMap<String, Value> = eval_graph(&g, &feeds).unwrap().into_iter().collect();
    let mut host = RmsProp::new(m.rmsprop(), &host_phi);
    host.update(&mut host_phi, &host_d).unwrap();
    for (k, (n, t)) in host_phi.iter().enumerate() {
        let want: Vec<f64> = t.as_f32().unwrap().iter().map(|&x| f64::from(x)).collect();
        let got = flat(&out[&next_name(n)]);
        let ms_want: Vec<f64> = host.ms[k].iter().map(|&x| f64::from(x)).collect();
        let ms_got = flat(&out[&next_name(&ms_name(n))]);
        for (a, b) in got.iter().zip(&want).chain(ms_got.iter().zip(&ms_want)) {
            assert!(
                a.is_finite() && (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{n}: graph {a} vs host {b}"
            );
        }
    }
}

/// Recompute checkpointing changes what BPTT keeps, not what it computes:
/// keeping every 2nd or 3rd state of a 5-step unroll (a regulariser and
/// imitation included) gives the same meta-loss and meta-gradient as keeping
/// all.
#[test]
fn checkpointed_bptt_equals_bptt_keeping_every_state() {
    let c = case(hutchinson_program());
    let labels: Vec<Vec<(String, Value)>> = (0..STEPS).map(|_| c.theta.clone()).collect();
    let layout = c.prog.layout();
    let run = |every: usize| {
        truncated_bptt(
            &mut runner(&c.prog),
            &layout,
            &Unroll {
                imitation: Some((labels.as_slice(), 0.5)),
                checkpoint_every: every,
                ..c.unroll(&c.phi)
            },
        )
        .unwrap()
    };
    let all = run(1);
    for every in [2, 3, 7] {
        let r = run(every);
        assert_eq!(r.meta_loss, all.meta_loss, "every {every}");
        for ((n, a), (_, b)) in r.d_phi.iter().zip(&all.d_phi) {
            assert_eq!(flat(a), flat(b), "{n}, every {every}");
        }
        for ((n, a), (_, b)) in r.theta.iter().zip(&all.theta) {
            assert_eq!(flat(a), flat(b), "{n}, every {every}");
        }
    }
}

/// An unroll whose regulariser weight is 0 measures the regulariser but runs
/// the VJP compiled without it (in the f64 interpreter and in a loaded
/// bundle), and gets the meta-loss and meta-gradient of the regularised VJP
/// with a zero cotangent.
#[test]
fn an_uncounted_regulariser_is_measured_but_not_differentiated() {
    let c = case(hutchinson_program());
    let layout = c.prog.layout();
    let uncounted = Unroll {
        reg_weight: 0.0,
        ..c.unroll(&c.phi)
    };
    let mut plain = runner(&c.prog);
    // This runner must not reach its regularised VJP (an empty graph fails).
    plain.graphs.insert("step_vjp", Graph::new());
    let mut full = runner(&c.prog);
    full.graphs.remove("step_unregularized");
    full.graphs.remove("step_vjp_unregularized");
    let a = truncated_bptt(&mut plain, &layout, &uncounted).unwrap();
    let b = truncated_bptt(&mut full, &layout, &uncounted).unwrap();
    // Both measured the regulariser.
    assert_eq!(a.regs, b.regs);
    assert_eq!(a.regs.len(), STEPS);
    assert!((a.meta_loss - b.meta_loss).abs() <= 1e-12 * b.meta_loss.abs());
    let (x, y): (Vec<f64>, Vec<f64>) = (
        a.d_phi.iter().flat_map(|(_, v)| flat(v)).collect(),
        b.d_phi.iter().flat_map(|(_, v)| flat(v)).collect(),
    );
    assert!(rel_err(&x, &y) < 1e-12, "f64: {}", rel_err(&x, &y));
    // A counted regulariser needs the regularised VJP.
    assert!(truncated_bptt(&mut plain, &layout, &c.unroll(&c.phi)).is_err());

    // The bundle carries both pairs; its runner switches the same way.
    let dir = std::env::temp_dir().join(format!("metac-l2o-unreg-{}", std::process::id()));
    let m = write_test_bundle(&c.prog, &dir);
    assert!(m.graph("step_unregularized").is_some() && m.graph("step_vjp_unregularized").is_some());
    let bundle = Bundle::load(&dir).unwrap();
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap();
    let host = HostCase::of(&c);
    let unroll = host.unroll(0.0);
    let mut plain = SessionRunner::from_bundle(&bundle, backend.as_ref()).unwrap();
    // Not the VJP: running it would fail.
    plain.sessions.insert(
        "step_vjp",
        backend
            .load(&bundle.graph_bytes("reset").unwrap(), "reset")
            .unwrap(),
    );
    let mut full = SessionRunner::from_bundle(&bundle, backend.as_ref()).unwrap();
    full.sessions.remove("step_unregularized");
    full.sessions.remove("step_vjp_unregularized");
    let a = truncated_bptt(&mut plain, &layout, &unroll).unwrap();
    let b = truncated_bptt(&mut full, &layout, &unroll).unwrap();
    assert_eq!(a.regs, b.regs);
    let e = rel_err(&flat_f32(&a.d_phi), &flat_f32(&b.d_phi));
    assert!(e < 1e-5, "bundle: meta-gradient rel err {e}");
    assert!((a.meta_loss - b.meta_loss).abs() <= 1e-6 * b.meta_loss.abs());
    let _ = std::fs::remove_dir_all(&dir);
}
