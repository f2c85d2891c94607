//! For every op: reverse-mode gradients, both HVPs (forward-over-reverse and
//! reverse-over-reverse) and the gradient of an HVP (third order) agree with
//! central finite differences computed in f64 by the reference interpreter.

use std::collections::HashMap;

use metac_graphs::autodiff::{grad, hvp_reverse_over_reverse, vjp_with_hook};
use metac_graphs::eval::{eval_graph, eval_nodes, Value};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph, Op};
use metac_tests::fixtures::op_cases;
use metac_tests::op_cases::{cases, harness, harness_on, sample, Case, Dist, Harness};
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn flat(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-6);
    num / den
}

fn run(g: &Graph, env: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, env).unwrap().into_iter().collect()
}

/// The loss alone (the element-by-element differences need nothing else).
fn loss_at(g: &Graph, env: &HashMap<String, Value>) -> f64 {
    let loss = g.find_output("loss").expect("loss output");
    let vals = eval_nodes(g, env, &[loss]).unwrap();
    flat(vals[loss.index()].as_ref().expect("loss value"))[0]
}

fn perturbed(
    env: &HashMap<String, Value>,
    dir: &HashMap<String, Value>,
    h: f64,
) -> HashMap<String, Value> {
    let mut e = env.clone();
    for (k, d) in dir {
        let x = e.get_mut(k).unwrap();
        if let (Value::F(a), Value::F(b)) = (x, d) {
            *a = &*a + &(b * h);
        }
    }
    e
}

fn check(c: &Case, optimized: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let h = harness(c, &mut rng);
    let mut env = HashMap::new();
    for (i, (s, d)) in c.inputs.iter().enumerate() {
        env.insert(format!("x{i}"), sample(&mut rng, s, *d));
    }
    check_harness(c.name, &h, env, &mut rng, optimized);
}

/// The checks of one harness at the inputs `env` (directions drawn from
/// `rng`), on its graph or (`optimized`) on the graph after `optimize`.
fn check_harness(
    case: &str,
    h: &Harness,
    mut env: HashMap<String, Value>,
    rng: &mut ChaCha8Rng,
    optimized: bool,
) {
    let g = if optimized {
        optimize(&h.g)
    } else {
        h.g.clone()
    };
    let mut v_dir = HashMap::new();
    let mut w_dir = HashMap::new();
    for (i, (name, _)) in h.float_inputs.iter().enumerate() {
        let s = env[name].shape().to_vec();
        let v = sample(rng, &s, Dist::U(-1.0, 1.0));
        let w = sample(rng, &s, Dist::U(-1.0, 1.0));
        env.insert(format!("v{i}"), v.clone());
        env.insert(format!("w{i}"), w.clone());
        v_dir.insert(name.clone(), v);
        w_dir.insert(name.clone(), w);
    }
    let out = run(&g, &env);
    let eps = 1e-5;
    for (i, (name, _)) in h.float_inputs.iter().enumerate() {
        // Gradient, element by element.
        let x = env[name].f().clone();
        let mut fd = vec![];
        for j in 0..x.len() {
            let mut e = HashMap::new();
            let mut d = ArrayD::zeros(x.raw_dim());
            d.as_slice_mut().unwrap()[j] = 1.0;
            e.insert(name.clone(), Value::F(d));
            let lp = loss_at(&g, &perturbed(&env, &e, eps));
            let lm = loss_at(&g, &perturbed(&env, &e, -eps));
            fd.push((lp - lm) / (2.0 * eps));
        }
        let gr = flat(&out[&format!("g{i}")]);
        let err = rel_err(&gr, &fd);
        assert!(
            err < 1e-6,
            "{case}: gradient wrt {name}: rel err {err:.3e}\n  got {gr:?}\n  fd  {fd:?}"
        );
        // HVP: directional difference of the gradient.
        let gp = flat(&run(&g, &perturbed(&env, &v_dir, eps))[&format!("g{i}")]);
        let gm = flat(&run(&g, &perturbed(&env, &v_dir, -eps))[&format!("g{i}")]);
        let fd_h: Vec<f64> = gp
            .iter()
            .zip(&gm)
            .map(|(p, m)| (p - m) / (2.0 * eps))
            .collect();
        for key in ["hf", "hr"] {
            let hv = flat(&out[&format!("{key}{i}")]);
            let err = rel_err(&hv, &fd_h);
            assert!(
                err < 1e-5,
                "{case}: {key} HVP wrt {name}: rel err {err:.3e}\n  got {hv:?}\n  fd  {fd_h:?}"
            );
        }
        let hf = flat(&out[&format!("hf{i}")]);
        let hr = flat(&out[&format!("hr{i}")]);
        // Equal up to the f32 rounding of constants such as 1/n in the two modes.
        assert!(
            rel_err(&hf, &hr) < 1e-6,
            "{case}: HVP modes disagree wrt {name}"
        );
        // Third order: directional difference of <HVP(v), w> along w_dir.
        let tp = flat(&run(&g, &perturbed(&env, &w_dir, eps))["t"])[0];
        let tm = flat(&run(&g, &perturbed(&env, &w_dir, -eps))["t"])[0];
        let fd_t = (tp - tm) / (2.0 * eps);
        let th: f64 = h
            .float_inputs
            .iter()
            .enumerate()
            .map(|(k, (nm, _))| {
                flat(&out[&format!("t{k}")])
                    .iter()
                    .zip(w_dir[nm].f().iter())
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            })
            .sum();
        if i == 0 {
            let err = (th - fd_t).abs() / fd_t.abs().max(1e-4);
            assert!(
                err < 1e-4,
                "{case}: third-order directional derivative: {th} vs fd {fd_t}"
            );
        }
    }
}

#[test]
fn every_op_gradient_hvp_and_third_order_match_finite_differences() {
    let mut failures = vec![];
    for c in cases() {
        for optimized in [false, true] {
            if let Err(e) = std::panic::catch_unwind(|| check(&c, optimized)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{:?}", e.downcast_ref::<&str>()));
                failures.push(format!(
                    "[{}{}] {msg}",
                    c.name,
                    if optimized { ", optimized" } else { "" }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_op_is_covered_by_a_gradient_check() {
    // The op names the cases above exercise.
    let mut seen = std::collections::BTreeSet::new();
    for c in cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let h = harness(&c, &mut rng);
        for n in h.g.nodes() {
            seen.insert(n.op.name());
        }
    }
    seen.insert("StopGradient"); // checked in stop_gradient_blocks_derivatives
                                 // Every op of the op set (from the enum itself).
    let all: Vec<&str> = Op::kinds().iter().map(Op::name).collect();
    assert!(
        all.len() >= 42 && all.contains(&"ConvTranspose2d"),
        "{all:?}"
    );
    let missing: Vec<_> = all.iter().filter(|n| !seen.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "ops without a gradient check: {missing:?}"
    );
}

#[test]
fn stop_gradient_blocks_derivatives() {
    // d/dx [tanh(x) * exp(sg(x))] = tanh'(x) * exp(x): the stopped factor is a constant.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]);
    let sg = g.stop_gradient(x);
    let e = g.exp(sg);
    let t = g.tanh(x);
    let y = g.mul(t, e);
    let l = g.sum_all(y);
    let gr = grad(&mut g, l, &[x])[0];
    let v = g.input("v", DType::F32, &[4]);
    let hv = hvp_reverse_over_reverse(&mut g, l, &[x], &[v])[0];
    g.output("g", gr);
    g.output("h", hv);
    let xs = [0.3, -0.7, 1.1, 0.05];
    let vs = [1.0, -2.0, 0.5, 3.0];
    let env: HashMap<String, Value> = [
        (
            "x".to_string(),
            Value::F(ArrayD::from_shape_vec(IxDyn(&[4]), xs.to_vec()).unwrap()),
        ),
        (
            "v".to_string(),
            Value::F(ArrayD::from_shape_vec(IxDyn(&[4]), vs.to_vec()).unwrap()),
        ),
    ]
    .into_iter()
    .collect();
    let out = run(&optimize(&g), &env);
    for i in 0..4 {
        let th = xs[i].tanh();
        let want_g = (1.0 - th * th) * xs[i].exp();
        let want_h = -2.0 * th * (1.0 - th * th) * xs[i].exp() * vs[i];
        assert!((flat(&out["g"])[i] - want_g).abs() < 1e-12);
        assert!((flat(&out["h"])[i] - want_h).abs() < 1e-12);
    }
}

#[test]
fn a_vjp_hook_gives_a_subgraph_its_own_derivative() {
    // y = exp(sg(x)) * x: reverse mode sees only the second factor's path;
    // a hook on u = exp(sg(x)) adds exp(x) * du to x, which restores the
    // full derivative exp(x) (1 + x), and sees du = x (complete: u's one
    // use has contributed).
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[3]);
    let sg = g.stop_gradient(x);
    let u = g.exp(sg);
    let y = g.mul(u, x);
    let l = g.sum_all(y);
    let seed = g.fill(1.0, DType::F32, &[]);
    let mut seen = vec![];
    let gr = vjp_with_hook(&mut g, &[(l, seed)], &[x], &[u], &mut |g, node, du| {
        seen.push((node, du));
        let c = g.exp(x);
        vec![(x, g.mul(c, du))]
    })[0]
        .unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, u);
    g.output("g", gr);
    g.output("du", seen[0].1);
    let xs = [0.3, -0.7, 1.1];
    let env: HashMap<String, Value> = [(
        "x".to_string(),
        Value::F(ArrayD::from_shape_vec(IxDyn(&[3]), xs.to_vec()).unwrap()),
    )]
    .into_iter()
    .collect();
    let out = run(&optimize(&g), &env);
    for (i, &xi) in xs.iter().enumerate() {
        let want = xi.exp() * (1.0 + xi);
        assert!((flat(&out["g"])[i] - want).abs() < 1e-12);
        assert!((flat(&out["du"])[i] - xi).abs() < 1e-12);
    }
}

/// The importer's pooling, LRN and hard-activation ops (built from IR
/// primitives, `graphs/src/onnx/import/pool.rs`) over their attribute space
/// (`tests/fixtures/onnx/pool_ops.ref.json`): gradient, both HVPs and third
/// order agree with finite differences, like every primitive's.
#[test]
fn imported_pooling_ops_match_finite_differences_to_third_order() {
    let mut failures = vec![];
    for case in op_cases() {
        let m = metac_graphs::onnx::import_bytes(&case.model, &case.name)
            .unwrap_or_else(|e| panic!("{e}"));
        let y = m.graph.outputs()[0].1;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let h = harness_on(m.graph, y, &mut rng);
        let x = Value::F(ArrayD::from_shape_vec(IxDyn(&case.x_shape), case.x.clone()).unwrap());
        let env = HashMap::from([("x".to_string(), x)]);
        for optimized in [false, true] {
            let run = || check_harness(&case.name, &h, env.clone(), &mut rng.clone(), optimized);
            if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{:?}", e.downcast_ref::<&str>()));
                failures.push(format!("[{}] {msg}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
