//! The HierarchicalRNN step graph, evaluated with the f64 reference
//! interpreter: shapes, finiteness, the size of the untrained update, the
//! first-step rules, determinism of the initialisers, and finite-difference
//! checks of its derivatives with respect to the optimizer's weights, the
//! input gradients, and (through a loss gradient) the optimizee parameters.

use std::collections::HashMap;

use metac_compiler::models::hrnn::{Hrnn, HrnnConfig, Level2Input, Packing, WeightInit};
use metac_graphs::autodiff::grad;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn shapes() -> Vec<Vec<usize>> {
    vec![vec![3, 2], vec![2]]
}

fn value(shape: &[usize], data: &[f64]) -> Value {
    let mut v = Value::from_tensor(&Tensor::f32(shape, vec![0.0; data.len()]));
    if let Value::F(a) = &mut v {
        for (x, d) in a.iter_mut().zip(data) {
            *x = *d;
        }
    }
    v
}

fn data(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

fn random_value(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64) -> Value {
    let n: usize = shape.iter().product();
    let d: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    value(shape, &d)
}

fn perturbed(v: &Value, i: usize, h: f64) -> Value {
    let mut v = v.clone();
    if let Value::F(a) = &mut v {
        *a.iter_mut().nth(i).unwrap() += h;
    }
    v
}

/// The step graph with every weight, parameter (`x{k}`), gradient (`g{k}`)
/// and state tensor as a named input; outputs `new.x{k}` (new parameters) then
/// `new.{state name}`.
struct StepGraph {
    g: Graph,
    w: Vec<NodeId>,
    params: Vec<NodeId>,
    grads: Vec<NodeId>,
    new_params: Vec<NodeId>,
    new_state: Vec<NodeId>,
}

fn step_graph(hrnn: &Hrnn, shapes: &[Vec<usize>], reset: bool) -> StepGraph {
    let mut g = Graph::new();
    let w = hrnn.weights().inputs(&mut g);
    let params: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("x{k}"), DType::F32, s))
        .collect();
    let grads: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("g{k}"), DType::F32, s))
        .collect();
    let mut state = hrnn.state_inputs(&mut g, shapes);
    if reset {
        state = hrnn.reset_hidden(&mut g, &w, &state);
    }
    let obj = g.input("objective", DType::F32, &[]);
    let (new_params, new_state) = hrnn.step(&mut g, &w, &params, &grads, &state, obj);
    let state_names: Vec<String> = hrnn
        .state_specs(shapes)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (k, &p) in new_params.iter().enumerate() {
        g.output(&format!("new.x{k}"), p);
    }
    for (n, &s) in state_names.iter().zip(&new_state) {
        g.output(&format!("new.{n}"), s);
    }
    StepGraph {
        g,
        w,
        params,
        grads,
        new_params,
        new_state,
    }
}

fn feeds_of(pairs: Vec<(String, Tensor)>) -> HashMap<String, Value> {
    pairs
        .into_iter()
        .map(|(n, t)| (n, Value::from_tensor(&t)))
        .collect()
}

fn run(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, feeds).unwrap().into_iter().collect()
}

/// The packed, feature-major state entries `{prefix}hrnn.state.*` of `map`
/// split per tensor and per scale under the names `{prefix}hrnn.p{k}.{h0,
/// accum{i}, ms{i}, inp_decay, scl_decay, log_lr, h1}` (`h0` element-major,
/// `[n, 10]` row-major) and `{prefix}hrnn.global.h2`, so that checks can be
/// written per tensor as the reference notes are.
fn unpack(
    map: &HashMap<String, Value>,
    sh: &[Vec<usize>],
    prefix: &str,
) -> HashMap<String, Vec<f64>> {
    let p = Packing::new(sh);
    let mut out = HashMap::new();
    for (name, v) in map {
        let Some(field) = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_prefix("hrnn.state."))
        else {
            continue;
        };
        let (d, rows, cols) = (data(v), v.shape()[0], v.shape()[1]);
        let at = |r: usize, c: usize| d[r * cols + c];
        if field == "h2" {
            out.insert(format!("{prefix}hrnn.global.h2"), d.clone());
            continue;
        }
        for k in 0..p.num_tensors() {
            let key = |f: &str| format!("{prefix}hrnn.p{k}.{f}");
            match field {
                "h1" => {
                    out.insert(key("h1"), (0..rows).map(|r| at(r, k)).collect());
                }
                "h0" => {
                    let v = p.range(k).flat_map(|j| (0..rows).map(move |r| (r, j)));
                    out.insert(key("h0"), v.map(|(r, j)| at(r, j)).collect());
                }
                "accum" | "ms" => {
                    for i in 0..rows {
                        let v = p.range(k).map(|j| at(i, j)).collect();
                        out.insert(key(&format!("{field}{i}")), v);
                    }
                }
                _ => {
                    out.insert(key(field), p.range(k).map(|j| at(0, j)).collect());
                }
            }
        }
    }
    out
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-300
}

#[test]
fn weight_list_and_initialisation() {
    let hrnn = Hrnn::default();
    let ws = hrnn.weights();
    let shape = |n: &str| {
        ws.specs[ws.index(n).unwrap_or_else(|| panic!("{n}"))]
            .shape
            .clone()
    };
    assert_eq!(hrnn.config.num_features(), 12);
    assert_eq!(shape("hrnn.l0.gates.w"), [22, 20]);
    assert_eq!(shape("hrnn.l0.cand.w"), [22, 10]);
    assert_eq!(shape("hrnn.l0.tensor_bias.w"), [20, 30]);
    assert_eq!(shape("hrnn.l0.global_bias.w"), [20, 30]);
    assert_eq!(shape("hrnn.l1.gates.w"), [42, 40]);
    assert_eq!(shape("hrnn.l1.cand.w"), [42, 20]);
    assert_eq!(shape("hrnn.l1.global_bias.w"), [20, 60]);
    assert_eq!(shape("hrnn.l2.gates.w"), [40, 40]);
    assert_eq!(shape("hrnn.l2.cand.w"), [40, 20]);
    assert_eq!(shape("hrnn.update.w"), [10, 1]);
    assert_eq!(shape("hrnn.shortcut.w"), [4, 1]);
    assert_eq!(shape("hrnn.lr_momentum_logit"), Vec::<usize>::new());

    let a = ws.init(7);
    assert_eq!(a, ws.init(7), "init is deterministic");
    assert_ne!(a, ws.init(8), "init depends on the seed");
    let get = |n: &str| {
        a.iter()
            .find(|(m, _)| m == n)
            .unwrap()
            .1
            .as_f32()
            .unwrap()
            .to_vec()
    };
    let all = |n: &str, v: f32| assert!(get(n).iter().all(|&x| x == v), "{n} should be all {v}");
    all("hrnn.l0.gates.b", 2.2);
    all("hrnn.l1.gates.b", 2.2);
    all("hrnn.l2.gates.b", 2.2);
    all("hrnn.l0.cand.b", 0.0);
    all("hrnn.l0.tensor_bias.b", 0.0);
    all("hrnn.scl_decay.b", 3.2);
    all("hrnn.inp_decay.b", 2.2);
    all("hrnn.lr.w", 0.0);
    all("hrnn.lr.b", 0.0);
    all("hrnn.lr_momentum_logit", 3.2);
    all("hrnn.param_stepsize_offset", -1.0);
    for n in ["hrnn.init.l0", "hrnn.init.l1", "hrnn.init.l2"] {
        assert!(
            get(n).iter().all(|&x| (-1.0..1.0).contains(&x)),
            "{n} in U(-1,1)"
        );
    }
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let s = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
        (m, s)
    };
    let (m, s) = stats(&get("hrnn.l1.gates.w"));
    let want = 0.5 / 42f64.sqrt();
    assert!(
        m.abs() < 0.1 * want && (s / want - 1.0).abs() < 0.06,
        "l1 gates mean {m} std {s}, want std {want}"
    );
    let (m, s) = stats(&get("hrnn.l0.global_bias.w"));
    let want = 0.5 / 20f64.sqrt();
    assert!(
        m.abs() < 0.1 * want && (s / want - 1.0).abs() < 0.1,
        "l0 global bias mean {m} std {s}"
    );
    // The shortcut weights are N(1/4, 0.1/sqrt(4)): 4 samples within 5 sigma.
    assert!(get("hrnn.shortcut.w")
        .iter()
        .all(|&x| (x - 0.25).abs() < 0.25));
    // Every spec is initialised as declared.
    for s in &ws.specs {
        if let WeightInit::Const(c) = s.init {
            all(&s.name, c as f32);
        }
    }
}

#[test]
fn initial_state_is_deterministic_and_in_range() {
    let hrnn = Hrnn::default();
    let sh = shapes();
    let specs = hrnn.state_specs(&sh);
    let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "hrnn.state.h0",
            "hrnn.state.accum",
            "hrnn.state.ms",
            "hrnn.state.inp_decay",
            "hrnn.state.scl_decay",
            "hrnn.state.log_lr",
            "hrnn.state.h1",
            "hrnn.state.h2"
        ]
    );
    assert_eq!(specs[0].1, [10, 8]);
    assert_eq!(specs[1].1, [4, 8]);
    assert_eq!(specs[5].1, [1, 8]);
    assert_eq!(specs[6].1, [20, 2]);
    assert_eq!(specs[7].1, [20, 1]);

    let a = hrnn.initial_state(&sh, 3);
    assert_eq!(a, hrnn.initial_state(&sh, 3));
    assert_ne!(a, hrnn.initial_state(&sh, 4));
    let (lo, hi) = (1e-6f64.ln(), 1e-2f64.ln());
    for ((n, t), (m, s)) in a.iter().zip(&specs) {
        assert_eq!(n, m);
        assert_eq!(&t.shape, s);
        let v = t.as_f32().unwrap();
        if n.ends_with("log_lr") {
            assert!(
                v.iter().all(|&x| (x as f64) >= lo && (x as f64) <= hi),
                "{n}: {v:?}"
            );
            assert!(v.iter().any(|&x| x != v[0]));
        } else {
            assert!(v.iter().all(|&x| x == 0.0), "{n} should start at 0");
        }
    }
    let w = hrnn.weights().init(0);
    let b = hrnn.initial_state_with_weights(&sh, &w, 3);
    assert_eq!(b, hrnn.initial_state_with_weights(&sh, &w, 3));
    let i0 = w
        .iter()
        .find(|(n, _)| n == "hrnn.init.l0")
        .unwrap()
        .1
        .as_f32()
        .unwrap();
    // h0 is [10, 8]: unit u of every element is init.l0[u].
    let h0 = b[0].1.as_f32().unwrap();
    for (u, &x) in i0.iter().enumerate() {
        assert!(h0[u * 8..(u + 1) * 8].iter().all(|&y| y == x));
    }
}

#[test]
fn first_and_second_step() {
    let hrnn = Hrnn::default();
    let sh = shapes();
    let sg = step_graph(&hrnn, &sh, false);
    let weights = hrnn.weights().init(0);
    let mut feeds = feeds_of(weights.clone());
    feeds.extend(feeds_of(hrnn.initial_state_with_weights(&sh, &weights, 0)));
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (k, s) in sh.iter().enumerate() {
        feeds.insert(format!("x{k}"), random_value(&mut rng, s, -1.0, 1.0));
        feeds.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    let out = run(&sg.g, &feeds);
    let (fu, ou) = (unpack(&feeds, &sh, ""), unpack(&out, &sh, "new."));
    let specs = hrnn.state_specs(&sh);
    for (n, s) in &specs {
        let v = &out[&format!("new.{n}")];
        assert_eq!(v.shape(), s.as_slice(), "{n}");
        assert!(data(v).iter().all(|x| x.is_finite()), "{n} not finite");
    }
    let eps12 = 1e-12f32 as f64;
    for (k, s) in sh.iter().enumerate() {
        let x0 = data(&feeds[&format!("x{k}")]);
        let x1 = data(&out[&format!("new.x{k}")]);
        assert_eq!(out[&format!("new.x{k}")].shape(), s.as_slice());
        let d: Vec<f64> = x0.iter().zip(&x1).map(|(a, b)| b - a).collect();
        let max = d.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(
            max < 1e-2 && max > 0.0,
            "untrained update of tensor {k}: max |dtheta| = {max}"
        );
        // Dynamic output scale: dtheta / lr has unit RMS over the tensor,
        // with lr = exp(log_lr - 1) (zero-initialised lr weights).
        let log_lr = &fu[&format!("hrnn.p{k}.log_lr")];
        let rms = (d
            .iter()
            .zip(log_lr)
            .map(|(d, l)| (d / (l - 1.0).exp()).powi(2))
            .sum::<f64>()
            / d.len() as f64)
            .sqrt();
        assert!(
            (rms - 1.0).abs() < 1e-9,
            "tensor {k}: RMS of the direction {rms}"
        );
        let new_log_lr = &ou[&format!("new.hrnn.p{k}.log_lr")];
        for (a, b) in log_lr.iter().zip(new_log_lr) {
            assert!(close(*a, *b, 1e-12));
        }
        // First step: inp_decay 0 => every accumulator is the gradient; all
        // ms are 0 => the scale decay is forced to 0 => ms = g^2 + 1e-12.
        let gr = data(&feeds[&format!("g{k}")]);
        for i in 0..4 {
            let acc = &ou[&format!("new.hrnn.p{k}.accum{i}")];
            let ms = &ou[&format!("new.hrnn.p{k}.ms{i}")];
            for j in 0..gr.len() {
                assert!(close(acc[j], gr[j], 1e-15), "accum{i}");
                assert!(
                    close(ms[j], gr[j] * gr[j] + eps12, 1e-12),
                    "ms{i}: {} vs {}",
                    ms[j],
                    gr[j] * gr[j]
                );
            }
        }
        for dn in ["inp_decay", "scl_decay"] {
            let v = &ou[&format!("new.hrnn.p{k}.{dn}")];
            assert!(v.iter().all(|&x| x > 0.0 && x < 1.0), "{dn}");
        }
    }

    // Second step from the first's outputs: the decays now apply.
    let mut feeds2 = feeds.clone();
    for (n, v) in &out {
        let name = n.strip_prefix("new.").unwrap_or(n);
        feeds2.insert(name.to_string(), v.clone());
    }
    for (k, s) in sh.iter().enumerate() {
        feeds2.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    let out2 = run(&sg.g, &feeds2);
    let (fu2, ou2) = (unpack(&feeds2, &sh, ""), unpack(&out2, &sh, "new."));
    for v in out2.values() {
        assert!(data(v).iter().all(|x| x.is_finite()));
    }
    for k in 0..sh.len() {
        let f = |n: &str| fu2[&format!("hrnn.p{k}.{n}")].clone();
        let o = |n: &str| ou2[&format!("new.hrnn.p{k}.{n}")].clone();
        let gr = data(&feeds2[&format!("g{k}")]);
        let (d0, s) = (f("inp_decay"), f("scl_decay"));
        for j in 0..gr.len() {
            let mut d = d0[j];
            for i in 0..4 {
                let acc = gr[j] * (1.0 - d) + f(&format!("accum{i}"))[j] * d;
                assert!(close(o(&format!("accum{i}"))[j], acc, 1e-12), "accum{i}");
                let ms = (1.0 - s[j]) * (acc * acc + eps12) + s[j] * f(&format!("ms{i}"))[j];
                assert!(close(o(&format!("ms{i}"))[j], ms, 1e-12), "ms{i}");
                d = d.sqrt();
            }
        }
    }
}

#[test]
fn reset_hidden_matches_host_initial_state() {
    let hrnn = Hrnn::default();
    let sh = shapes();
    let with_reset = step_graph(&hrnn, &sh, true);
    let without = step_graph(&hrnn, &sh, false);
    let weights = hrnn.weights().init(5);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut base = feeds_of(weights.clone());
    for (k, s) in sh.iter().enumerate() {
        base.insert(format!("x{k}"), random_value(&mut rng, s, -1.0, 1.0));
        base.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    let mut fa = base.clone();
    fa.extend(feeds_of(hrnn.initial_state(&sh, 9)));
    let mut fb = base;
    fb.extend(feeds_of(hrnn.initial_state_with_weights(&sh, &weights, 9)));
    let (a, b) = (run(&with_reset.g, &fa), run(&without.g, &fb));
    for (n, v) in &a {
        assert_eq!(data(v), data(&b[n]), "{n}");
    }
}

/// Weights near the initialisation but with every tensor perturbed (so that
/// no derivative is zero by symmetry), and a mid-run state.
fn generic_point(hrnn: &Hrnn, sh: &[Vec<usize>], seed: u64) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = HashMap::new();
    for (n, t) in hrnn.weights().init(seed) {
        let mut v = Value::from_tensor(&t);
        if let Value::F(a) = &mut v {
            for x in a.iter_mut() {
                *x += rng.random_range(-0.1..0.1);
            }
        }
        feeds.insert(n, v);
    }
    for (n, s) in hrnn.state_specs(sh) {
        let (lo, hi) = match n.rsplit('.').next().unwrap() {
            x if x.starts_with("accum") => (-0.5, 0.5),
            x if x.starts_with("ms") => (0.05, 1.0),
            "inp_decay" | "scl_decay" => (0.2, 0.9),
            // Large enough that the parameter update is not lost in rounding,
            // and inside the clip range.
            "log_lr" => (-2.0, -0.5),
            _ => (-1.0, 1.0),
        };
        feeds.insert(n, random_value(&mut rng, &s, lo, hi));
    }
    feeds
}

/// Scalar objectives of a step graph: `sum_k <new_params_k, r_k>` and
/// `sum_j <new_state_j, r_j>` with fixed random `r`.
fn objectives(sg: &mut StepGraph, seed: u64) -> (NodeId, NodeId) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dot = |g: &mut Graph, xs: &[NodeId]| {
        let mut acc: Option<NodeId> = None;
        for &x in xs {
            let s = g.shape(x).to_vec();
            let n: usize = s.iter().product();
            let r = g.constant(Tensor::f32(
                &s,
                (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            ));
            let p = g.mul(x, r);
            let t = g.sum_all(p);
            acc = g.add_opt(acc, Some(t));
        }
        acc.unwrap()
    };
    let fp = dot(&mut sg.g, &sg.new_params.clone());
    let fs = dot(&mut sg.g, &sg.new_state.clone());
    (fp, fs)
}

/// (input name, element, objective, analytic derivative, finite difference).
type FdRow = (String, usize, &'static str, f64, f64);

/// Finite-difference check of the gradients of `fs` (by name) with respect
/// to the inputs `wrt` at the elements `picks` (input name, flat index).
/// Returns the largest relative error and the analytic values.
fn fd_check(
    g: &Graph,
    objectives: &[(&str, NodeId)],
    wrt: &[(String, NodeId)],
    picks: &[(String, usize)],
    feeds: &HashMap<String, Value>,
) -> (f64, Vec<FdRow>) {
    let mut ga = g.clone();
    let mut outs = vec![];
    for (oname, f) in objectives {
        let ids: Vec<NodeId> = wrt.iter().map(|(_, id)| *id).collect();
        let grads = grad(&mut ga, *f, &ids);
        for ((wname, _), gid) in wrt.iter().zip(grads) {
            outs.push((format!("d{oname}/d{wname}"), gid));
        }
    }
    ga.set_outputs(outs);
    let analytic = run(&ga, feeds);
    let mut gf = g.clone();
    gf.set_outputs(
        objectives
            .iter()
            .map(|(n, f)| (n.to_string(), *f))
            .collect(),
    );
    let mut worst = 0f64;
    let mut rows = vec![];
    for (name, i) in picks {
        let x = &feeds[name];
        let scale = data(x)[*i].abs().max(1.0);
        let h = 1e-5 * scale;
        let mut fp = feeds.clone();
        fp.insert(name.clone(), perturbed(x, *i, h));
        let mut fm = feeds.clone();
        fm.insert(name.clone(), perturbed(x, *i, -h));
        let (op, om) = (run(&gf, &fp), run(&gf, &fm));
        for (oname, _) in objectives {
            let fd = (data(&op[*oname])[0] - data(&om[*oname])[0]) / (2.0 * h);
            let a = data(&analytic[&format!("d{oname}/d{name}")])[*i];
            // Relative error, with an absolute floor for derivatives that are
            // (correctly) zero: the FD noise is ~1e-16 |f| / h.
            let err = (a - fd).abs() / a.abs().max(fd.abs()).max(1e-4);
            worst = worst.max(err);
            let oname: &'static str = if *oname == "fp" { "fp" } else { "fs" };
            rows.push((name.clone(), *i, oname, a, fd));
            assert!(
                err < 1e-5,
                "d{oname}/d{name}[{i}]: analytic {a:e}, finite difference {fd:e} (rel err {err:e})"
            );
        }
    }
    (worst, rows)
}

/// One random element of every weight tensor.
fn weight_picks(hrnn: &Hrnn, rng: &mut ChaCha8Rng) -> Vec<(String, usize)> {
    hrnn.weights()
        .specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                rng.random_range(0..s.shape.iter().product::<usize>()),
            )
        })
        .collect()
}

fn check_meta_gradient(config: HrnnConfig, reset: bool, seed: u64) {
    let hrnn = Hrnn::new(config);
    let sh = shapes();
    let mut sg = step_graph(&hrnn, &sh, reset);
    let (fp, fs) = objectives(&mut sg, seed + 100);
    let mut feeds = generic_point(&hrnn, &sh, seed);
    if reset {
        // The true first step: host initial state (zero accumulators and ms,
        // so the first-step rule is active; hidden states from the weights).
        feeds.extend(feeds_of(hrnn.initial_state(&sh, seed)));
    }
    // Zero parameters: the new parameters are then exactly -lr * delta, so
    // their finite differences are not swamped by rounding of theta.
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 7);
    for (k, s) in sh.iter().enumerate() {
        feeds.insert(format!("x{k}"), value(s, &vec![0.0; s.iter().product()]));
        feeds.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    let ws = hrnn.weights();
    let wrt: Vec<(String, NodeId)> = ws
        .specs
        .iter()
        .map(|s| s.name.clone())
        .zip(sg.w.iter().copied())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let picks = weight_picks(&hrnn, &mut rng);
    let (worst, rows) = fd_check(&sg.g, &[("fp", fp), ("fs", fs)], &wrt, &picks, &feeds);
    eprintln!(
        "meta-gradient FD check (reset {reset}): {} elements, worst rel err {worst:.2e}",
        picks.len()
    );
    // Every weight tensor reaches some output (init vectors only on a reset).
    for (name, _) in &picks {
        let m = rows
            .iter()
            .filter(|r| &r.0 == name)
            .fold(0f64, |m, r| m.max(r.3.abs()));
        if !name.starts_with("hrnn.init.") || reset {
            assert!(m > 1e-6, "{name}: no derivative reaches the outputs");
        }
    }

    // The same objectives with respect to the input gradients (the
    // second-derivative path of meta-training).
    let wrt: Vec<(String, NodeId)> = sg
        .grads
        .iter()
        .enumerate()
        .map(|(k, &id)| (format!("g{k}"), id))
        .collect();
    let picks = vec![("g0".to_string(), 3), ("g1".to_string(), 1)];
    let (worst, rows) = fd_check(&sg.g, &[("fp", fp), ("fs", fs)], &wrt, &picks, &feeds);
    eprintln!("input-gradient FD check (reset {reset}): worst rel err {worst:.2e}");
    assert!(rows.iter().all(|r| r.3 != 0.0));
}

#[test]
fn meta_gradient_matches_finite_differences_mid_run() {
    check_meta_gradient(HrnnConfig::default(), false, 21);
}

#[test]
fn meta_gradient_matches_finite_differences_first_step_with_reset() {
    check_meta_gradient(HrnnConfig::default(), true, 22);
}

#[test]
fn meta_gradient_matches_finite_differences_mean_over_tensors() {
    let config = HrnnConfig {
        level2_input: Level2Input::MeanOverTensors,
        ..HrnnConfig::default()
    };
    check_meta_gradient(config, false, 23);
}

#[test]
fn reduced_configs_build_and_differentiate() {
    let config = HrnnConfig {
        num_gradient_scales: 1,
        learnable_decay: false,
        use_gradient_shortcut: false,
        use_problem_lr_mean: false,
        ..HrnnConfig::default()
    };
    check_meta_gradient(config, false, 24);
    let config = HrnnConfig {
        dynamic_output_scale: false,
        use_relative_lr: false,
        use_grad_products: false,
        use_log_means_squared: false,
        ..HrnnConfig::default()
    };
    assert_eq!(config.num_features(), 4);
    check_meta_gradient(config, false, 25);
}

/// Second derivatives through the optimizee: the gradients fed to the step
/// are the autodiff gradient of a loss of the parameters, and the objective
/// is differentiated with respect to those parameters (Hessian terms).
#[test]
fn derivative_through_loss_gradient_matches_finite_differences() {
    let hrnn = Hrnn::default();
    let sh = shapes();
    let mut g = Graph::new();
    let w = hrnn.weights().inputs(&mut g);
    let params: Vec<_> = sh
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("x{k}"), DType::F32, s))
        .collect();
    // L = sum_k sum(c_k * sigmoid(3 x_k) + 0.5 x_k^2 * x_k)  (non-quadratic)
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut loss: Option<NodeId> = None;
    for (k, &p) in params.iter().enumerate() {
        let n: usize = sh[k].iter().product();
        let c = g.constant(Tensor::f32(
            &sh[k],
            (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        ));
        let p3 = g.mul_scalar(p, 3.0);
        let s = g.sigmoid(p3);
        let a = g.mul(c, s);
        let cube = g.mul(p, p);
        let cube = g.mul(cube, p);
        let b = g.mul_scalar(cube, 0.5);
        let t = g.add(a, b);
        let t = g.sum_all(t);
        loss = g.add_opt(loss, Some(t));
    }
    let grads = grad(&mut g, loss.unwrap(), &params);
    let state = hrnn.state_inputs(&mut g, &sh);
    let obj = g.input("objective", DType::F32, &[]);
    let (np, ns) = hrnn.step(&mut g, &w, &params, &grads, &state, obj);
    let mut sg = StepGraph {
        g,
        w,
        params: params.clone(),
        grads,
        new_params: np,
        new_state: ns,
    };
    let (fp, fs) = objectives(&mut sg, 32);
    let mut feeds = generic_point(&hrnn, &sh, 33);
    for (k, s) in sh.iter().enumerate() {
        feeds.insert(format!("x{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    let wrt: Vec<(String, NodeId)> = sg
        .params
        .iter()
        .enumerate()
        .map(|(k, &id)| (format!("x{k}"), id))
        .collect();
    let picks = vec![
        ("x0".to_string(), 0),
        ("x0".to_string(), 4),
        ("x1".to_string(), 1),
    ];
    let (worst, _) = fd_check(&sg.g, &[("fp", fp), ("fs", fs)], &wrt, &picks, &feeds);
    eprintln!("through-the-loss-gradient FD check: worst rel err {worst:.2e}");
}

// ---- an independent host implementation of the step, in f64 -----------------

/// Row-major matrix.
#[derive(Clone, Debug)]
struct M {
    r: usize,
    c: usize,
    d: Vec<f64>,
}

impl M {
    fn new(r: usize, c: usize, d: Vec<f64>) -> Self {
        assert_eq!(d.len(), r * c);
        M { r, c, d }
    }
    fn row(&self, i: usize) -> &[f64] {
        &self.d[i * self.c..(i + 1) * self.c]
    }
    /// `self . w (+ b)`, `w` as `[c, out]`.
    fn affine(&self, w: &[f64], out: usize, b: Option<&[f64]>) -> M {
        let mut d = vec![0.0; self.r * out];
        for i in 0..self.r {
            for j in 0..out {
                let mut s = 0.0;
                for k in 0..self.c {
                    s += self.d[i * self.c + k] * w[k * out + j];
                }
                d[i * out + j] = s + b.map_or(0.0, |b| b[j]);
            }
        }
        M::new(self.r, out, d)
    }
    fn hcat(a: &M, b: &M) -> M {
        assert_eq!(a.r, b.r);
        let mut d = vec![];
        for i in 0..a.r {
            d.extend_from_slice(a.row(i));
            d.extend_from_slice(b.row(i));
        }
        M::new(a.r, a.c + b.c, d)
    }
    fn mean_rows(&self) -> M {
        let d = (0..self.c)
            .map(|j| (0..self.r).map(|i| self.d[i * self.c + j]).sum::<f64>() / self.r as f64)
            .collect();
        M::new(1, self.c, d)
    }
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

struct Ref<'a> {
    w: &'a HashMap<String, Value>,
}

impl Ref<'_> {
    fn w(&self, n: &str) -> Vec<f64> {
        data(&self.w[&format!("hrnn.{n}")])
    }
    fn gru(&self, lvl: usize, x: &M, h: &M, bias: Option<&[f64]>, n: usize) -> M {
        let gates = M::hcat(x, h).affine(
            &self.w(&format!("l{lvl}.gates.w")),
            2 * n,
            Some(&self.w(&format!("l{lvl}.gates.b"))),
        );
        let mut out = vec![];
        let mut rh = vec![];
        let mut us = vec![];
        for i in 0..x.r {
            for j in 0..n {
                let bj = |o: usize| bias.map_or(0.0, |b| b[o + j]);
                let r = sig(gates.d[i * 2 * n + j] + bj(0));
                let u = sig(gates.d[i * 2 * n + n + j] + bj(n));
                rh.push(r * h.d[i * n + j]);
                us.push(u);
            }
        }
        let cand = M::hcat(x, &M::new(x.r, n, rh)).affine(
            &self.w(&format!("l{lvl}.cand.w")),
            n,
            Some(&self.w(&format!("l{lvl}.cand.b"))),
        );
        for i in 0..x.r {
            for j in 0..n {
                let c = (cand.d[i * n + j] + bias.map_or(0.0, |b| b[2 * n + j])).tanh();
                let u = us[i * n + j];
                out.push(u * h.d[i * n + j] + (1.0 - u) * c);
            }
        }
        M::new(x.r, n, out)
    }
}

/// The default-config step (with either level-2 input), written directly
/// from the reference notes. Returns new params `new.x{k}` and `new.{state}`.
fn reference_step(
    level2: Level2Input,
    sh: &[Vec<usize>],
    feeds: &HashMap<String, Value>,
) -> HashMap<String, Vec<f64>> {
    let rf = Ref { w: feeds };
    let unpacked = unpack(feeds, sh, "");
    let st = |k: usize, n: &str| unpacked[&format!("hrnn.p{k}.{n}")].clone();
    let e12 = 1e-12f32 as f64;
    let e16 = 1e-16f32 as f64;
    let mut out = HashMap::new();
    let total: usize = sh.iter().map(|s| s.iter().product::<usize>()).sum();
    let mean_log_lr = (0..sh.len())
        .map(|k| st(k, "log_lr").iter().sum::<f64>())
        .sum::<f64>()
        / total as f64;
    let h2_old = M::new(1, 20, unpacked["hrnn.global.h2"].clone());
    let gb0 = h2_old.affine(
        &rf.w("l0.global_bias.w"),
        30,
        Some(&rf.w("l0.global_bias.b")),
    );
    let gb1 = h2_old.affine(
        &rf.w("l1.global_bias.w"),
        60,
        Some(&rf.w("l1.global_bias.b")),
    );
    let mut h1s = vec![];
    for (k, s) in sh.iter().enumerate() {
        let n: usize = s.iter().product();
        let g = data(&feeds[&format!("g{k}")]);
        let (inp, scl, log_lr) = (st(k, "inp_decay"), st(k, "scl_decay"), st(k, "log_lr"));
        let mut feats = vec![vec![0.0; 12]; n];
        let mut gs_all = vec![vec![0.0; 4]; n];
        for i in 0..4 {
            let acc_old = st(k, &format!("accum{i}"));
            let ms_old = st(k, &format!("ms{i}"));
            let all_zero = ms_old.iter().all(|&m| m == 0.0);
            let (mut accs, mut mss) = (vec![], vec![]);
            for j in 0..n {
                let mut d = inp[j];
                for _ in 0..i {
                    d = d.sqrt();
                }
                let acc = g[j] * (1.0 - d) + acc_old[j] * d;
                let sd = if all_zero { 0.0 } else { scl[j] };
                let ms = (1.0 - sd) * (acc * acc + e12) + sd * ms_old[j];
                gs_all[j][i] = (acc / (ms + e16).sqrt()).asinh();
                feats[j][i] = gs_all[j][i];
                feats[j][7 + i] = (ms + e16).ln();
                accs.push(acc);
                mss.push(ms);
            }
            out.insert(format!("new.hrnn.p{k}.accum{i}"), accs);
            out.insert(format!("new.hrnn.p{k}.ms{i}"), mss);
        }
        for j in 0..n {
            for i in 0..3 {
                feats[j][4 + i] = gs_all[j][i] * gs_all[j][i + 1];
            }
            let avg = feats[j][7..11].iter().sum::<f64>() / 4.0;
            for f in &mut feats[j][7..11] {
                *f -= avg;
            }
            feats[j][11] = log_lr[j] - mean_log_lr;
        }
        let x = M::new(n, 12, feats.concat());
        let h1_old = M::new(1, 20, st(k, "h1"));
        let tb = h1_old.affine(
            &rf.w("l0.tensor_bias.w"),
            30,
            Some(&rf.w("l0.tensor_bias.b")),
        );
        let bias0: Vec<f64> = tb.d.iter().zip(&gb0.d).map(|(a, b)| a + b).collect();
        let h0 = rf.gru(0, &x, &M::new(n, 10, st(k, "h0")), Some(&bias0), 10);
        let l1_in = M::hcat(&h0, &x).mean_rows();
        let h1 = rf.gru(1, &l1_in, &h1_old, Some(&gb1.d), 20);
        let mut delta = h0.affine(&rf.w("update.w"), 1, None).d;
        let sc = M::new(n, 4, gs_all.concat())
            .affine(&rf.w("shortcut.w"), 1, None)
            .d;
        for j in 0..n {
            delta[j] += sc[j];
        }
        let rms = (delta.iter().map(|d| d * d).sum::<f64>() / n as f64 + e16).sqrt();
        let readout = |name: &str| -> Vec<f64> {
            h0.affine(
                &rf.w(&format!("{name}.w")),
                1,
                Some(&rf.w(&format!("{name}.b"))),
            )
            .d
        };
        out.insert(
            format!("new.hrnn.p{k}.scl_decay"),
            readout("scl_decay").into_iter().map(sig).collect(),
        );
        out.insert(
            format!("new.hrnn.p{k}.inp_decay"),
            readout("inp_decay").into_iter().map(sig).collect(),
        );
        let change = readout("lr");
        let lrm = sig(rf.w("lr_momentum_logit")[0]);
        let offset = rf.w("param_stepsize_offset")[0];
        let p = data(&feeds[&format!("x{k}")]);
        let (mut new_p, mut new_lr) = (vec![], vec![]);
        for j in 0..n {
            let step_log_lr = (log_lr[j] + change[j]).clamp(-33.0, 33.0);
            new_lr.push(lrm * log_lr[j] + (1.0 - lrm) * step_log_lr);
            new_p.push(p[j] - (step_log_lr + offset).exp() * delta[j] / rms);
        }
        out.insert(format!("new.x{k}"), new_p);
        out.insert(format!("new.hrnn.p{k}.log_lr"), new_lr);
        out.insert(format!("new.hrnn.p{k}.h0"), h0.d.clone());
        out.insert(format!("new.hrnn.p{k}.h1"), h1.d.clone());
        h1s.push(h1);
    }
    let l2_in = match level2 {
        Level2Input::LastTensor => h1s.last().unwrap().clone(),
        Level2Input::MeanOverTensors => M::new(
            h1s.len(),
            20,
            h1s.iter().flat_map(|h| h.d.clone()).collect(),
        )
        .mean_rows(),
    };
    out.insert(
        "new.hrnn.global.h2".into(),
        rf.gru(2, &l2_in, &h2_old, None, 20).d,
    );
    out
}

fn compare_with_reference(level2: Level2Input, first_step: bool, seed: u64) {
    let config = HrnnConfig {
        level2_input: level2,
        ..HrnnConfig::default()
    };
    let hrnn = Hrnn::new(config);
    // Three tensors, so that "last" and "mean" differ.
    let sh = vec![vec![3, 2], vec![2], vec![4]];
    let sg = step_graph(&hrnn, &sh, false);
    let mut feeds = generic_point(&hrnn, &sh, seed);
    if first_step {
        let w: Vec<(String, Tensor)> = hrnn.weights().init(seed);
        feeds.extend(feeds_of(hrnn.initial_state_with_weights(&sh, &w, seed)));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 3);
    for (k, s) in sh.iter().enumerate() {
        feeds.insert(format!("x{k}"), random_value(&mut rng, s, -1.0, 1.0));
        feeds.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    // One tensor with an exactly zero gradient element and a clipped log lr.
    if !first_step {
        let mut l = data(&feeds["hrnn.state.log_lr"]);
        l[Packing::new(&sh).offsets[1]] = 40.0;
        feeds.insert("hrnn.state.log_lr".into(), value(&[1, l.len()], &l));
    }
    let out = run(&sg.g, &feeds);
    let mut got = unpack(&out, &sh, "new.");
    for k in 0..sh.len() {
        got.insert(format!("new.x{k}"), data(&out[&format!("new.x{k}")]));
    }
    let want = reference_step(level2, &sh, &feeds);
    assert_eq!(got.len(), want.len());
    for (n, w) in &want {
        let gv = &got[n];
        assert_eq!(gv.len(), w.len(), "{n}");
        for (i, (a, b)) in gv.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-10 * a.abs().max(b.abs()).max(1.0),
                "{n}[{i}]: graph {a}, reference {b}"
            );
        }
    }
}

#[test]
fn step_matches_host_reference() {
    compare_with_reference(Level2Input::LastTensor, false, 41);
    compare_with_reference(Level2Input::MeanOverTensors, false, 42);
    compare_with_reference(Level2Input::LastTensor, true, 43);
    compare_with_reference(Level2Input::MeanOverTensors, true, 44);
}

/// The step and its meta-gradient go through the standard passes and an
/// ONNX export / import round trip with unchanged values.
#[test]
fn step_and_meta_gradient_survive_optimize_and_onnx_roundtrip() {
    use metac_graphs::onnx::{export::export_bytes, import::import_bytes};
    use metac_graphs::passes::optimize;

    let hrnn = Hrnn::default();
    let sh = shapes();
    let mut sg = step_graph(&hrnn, &sh, true);
    let (fp, fs) = objectives(&mut sg, 51);
    let f = sg.g.add(fp, fs);
    let dw = grad(&mut sg.g, f, &sg.w.clone());
    let mut outs: Vec<(String, NodeId)> = sg.g.outputs().to_vec();
    for (s, d) in hrnn.weights().specs.iter().zip(dw) {
        outs.push((format!("d.{}", s.name), d));
    }
    sg.g.set_outputs(outs);
    let opt = optimize(&sg.g);
    let bytes = export_bytes(&opt, "hrnn_step").expect("export");
    let imported = import_bytes(&bytes, "hrnn_step").expect("import");

    let mut feeds = generic_point(&hrnn, &sh, 52);
    feeds.extend(feeds_of(hrnn.initial_state(&sh, 52)));
    let mut rng = ChaCha8Rng::seed_from_u64(53);
    for (k, s) in sh.iter().enumerate() {
        feeds.insert(format!("x{k}"), random_value(&mut rng, s, -1.0, 1.0));
        feeds.insert(format!("g{k}"), random_value(&mut rng, s, -1.0, 1.0));
    }
    feeds.insert("objective".into(), value(&[], &[0.0]));
    let want = run(&sg.g, &feeds);
    let got_opt = run(&opt, &feeds);
    let mut feeds_imp = feeds.clone();
    feeds_imp.extend(feeds_of(imported.initializers.clone()));
    let got_imp = run(&imported.graph, &feeds_imp);
    eprintln!(
        "nodes: built {}, optimized {}; outputs {}",
        sg.g.len(),
        opt.len(),
        want.len()
    );
    for got in [&got_opt, &got_imp] {
        assert_eq!(got.len(), want.len());
        for (n, w) in &want {
            for (a, b) in data(&got[n]).iter().zip(data(w)) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-3),
                    "{n}: {a} vs {b}"
                );
            }
        }
    }
}
