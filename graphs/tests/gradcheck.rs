//! For every op: reverse-mode gradients, both HVPs (forward-over-reverse and
//! reverse-over-reverse) and the gradient of an HVP (third order) agree with
//! central finite differences computed in f64 by the reference interpreter.

use std::collections::HashMap;

use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse, inner_product};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::passes::optimize;
use metac_graphs::{ConvParams, DType, Graph, NodeId, Tensor};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to draw an input: uniform in [lo, hi], or integers below `n` (indices).
#[derive(Clone, Copy)]
enum Dist {
    U(f64, f64),
    Idx(i64),
}

struct Case {
    name: &'static str,
    inputs: Vec<(Vec<usize>, Dist)>,
    build: fn(&mut Graph, &[NodeId]) -> NodeId,
}

fn case(name: &'static str, inputs: Vec<(Vec<usize>, Dist)>, build: fn(&mut Graph, &[NodeId]) -> NodeId) -> Case {
    Case { name, inputs, build }
}

fn sample(rng: &mut ChaCha8Rng, shape: &[usize], d: Dist) -> Value {
    let n: usize = shape.iter().product();
    match d {
        Dist::U(lo, hi) => Value::F(ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| rng.random_range(lo..hi)).collect()).unwrap()),
        Dist::Idx(k) => Value::I(ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| rng.random_range(0..k)).collect()).unwrap()),
    }
}

/// Build `loss = sum(r1 * y + r2 * y^2)` around the case's output so that
/// every op sees a non-trivial cotangent and a non-zero second derivative.
struct Harness {
    g: Graph,
    float_inputs: Vec<(String, NodeId)>,
    grads: Vec<NodeId>,
    hvp_fr: Vec<NodeId>,
    hvp_rr: Vec<NodeId>,
    third: Vec<NodeId>,
}

fn harness(c: &Case, rng: &mut ChaCha8Rng) -> Harness {
    let mut g = Graph::new();
    let mut xs = vec![];
    for (i, (s, d)) in c.inputs.iter().enumerate() {
        let dt = if matches!(d, Dist::Idx(_)) { DType::I64 } else { DType::F32 };
        xs.push(g.input(&format!("x{i}"), dt, s));
    }
    let y = (c.build)(&mut g, &xs);
    let ys = g.shape(y).to_vec();
    let n: usize = ys.iter().product();
    let r1 = g.constant(Tensor::f32(&ys, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()));
    let r2 = g.constant(Tensor::f32(&ys, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()));
    let a = g.mul(r1, y);
    let y2 = g.mul(y, y);
    let b = g.mul(r2, y2);
    let s = g.add(a, b);
    let loss = g.sum_all(s);
    let float_inputs: Vec<(String, NodeId)> =
        g.inputs().into_iter().filter(|(_, id)| g.dtype(*id) == DType::F32).collect();
    let wrt: Vec<NodeId> = float_inputs.iter().map(|(_, id)| *id).collect();
    let vs: Vec<NodeId> = wrt.iter().enumerate().map(|(i, &w)| { let s = g.shape(w).to_vec(); g.input(&format!("v{i}"), DType::F32, &s) }).collect();
    let ws: Vec<NodeId> = wrt.iter().enumerate().map(|(i, &w)| { let s = g.shape(w).to_vec(); g.input(&format!("w{i}"), DType::F32, &s) }).collect();
    g.output("loss", loss);
    let grads = grad(&mut g, loss, &wrt);
    let hvp_fr = hvp_forward_over_reverse(&mut g, loss, &wrt, &vs);
    let hvp_rr = hvp_reverse_over_reverse(&mut g, loss, &wrt, &vs);
    // Third order: gradient of <HVP(v), w>.
    let t = inner_product(&mut g, &hvp_rr, &ws);
    g.output("t", t);
    let third = grad(&mut g, t, &wrt);
    for (i, id) in grads.iter().enumerate() { g.output(&format!("g{i}"), *id); }
    for (i, id) in hvp_fr.iter().enumerate() { g.output(&format!("hf{i}"), *id); }
    for (i, id) in hvp_rr.iter().enumerate() { g.output(&format!("hr{i}"), *id); }
    for (i, id) in third.iter().enumerate() { g.output(&format!("t{i}"), *id); }
    Harness { g, float_inputs, grads, hvp_fr, hvp_rr, third }
}

fn flat(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-6);
    num / den
}

fn run(g: &Graph, env: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, env).unwrap().into_iter().collect()
}

fn perturbed(env: &HashMap<String, Value>, dir: &HashMap<String, Value>, h: f64) -> HashMap<String, Value> {
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
    let g = if optimized { optimize(&h.g) } else { h.g.clone() };
    let _ = (&h.grads, &h.hvp_fr, &h.hvp_rr, &h.third);
    let mut env = HashMap::new();
    for (i, (s, d)) in c.inputs.iter().enumerate() {
        env.insert(format!("x{i}"), sample(&mut rng, s, *d));
    }
    let mut v_dir = HashMap::new();
    let mut w_dir = HashMap::new();
    for (i, (name, _)) in h.float_inputs.iter().enumerate() {
        let s = env[name].shape().to_vec();
        let v = sample(&mut rng, &s, Dist::U(-1.0, 1.0));
        let w = sample(&mut rng, &s, Dist::U(-1.0, 1.0));
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
            let lp = flat(&run(&g, &perturbed(&env, &e, eps))["loss"])[0];
            let lm = flat(&run(&g, &perturbed(&env, &e, -eps))["loss"])[0];
            fd.push((lp - lm) / (2.0 * eps));
        }
        let gr = flat(&out[&format!("g{i}")]);
        let err = rel_err(&gr, &fd);
        assert!(err < 1e-6, "{}: gradient wrt {name}: rel err {err:.3e}\n  got {gr:?}\n  fd  {fd:?}", c.name);
        // HVP: directional difference of the gradient.
        let gp = flat(&run(&g, &perturbed(&env, &v_dir, eps))[&format!("g{i}")]);
        let gm = flat(&run(&g, &perturbed(&env, &v_dir, -eps))[&format!("g{i}")]);
        let fd_h: Vec<f64> = gp.iter().zip(&gm).map(|(p, m)| (p - m) / (2.0 * eps)).collect();
        for key in ["hf", "hr"] {
            let hv = flat(&out[&format!("{key}{i}")]);
            let err = rel_err(&hv, &fd_h);
            assert!(err < 1e-5, "{}: {key} HVP wrt {name}: rel err {err:.3e}\n  got {hv:?}\n  fd  {fd_h:?}", c.name);
        }
        let hf = flat(&out[&format!("hf{i}")]);
        let hr = flat(&out[&format!("hr{i}")]);
        // Equal up to the f32 rounding of constants such as 1/n in the two modes.
        assert!(rel_err(&hf, &hr) < 1e-6, "{}: HVP modes disagree wrt {name}", c.name);
        // Third order: directional difference of <HVP(v), w> along w_dir.
        let tp = flat(&run(&g, &perturbed(&env, &w_dir, eps))["t"])[0];
        let tm = flat(&run(&g, &perturbed(&env, &w_dir, -eps))["t"])[0];
        let fd_t = (tp - tm) / (2.0 * eps);
        let th: f64 = h.float_inputs.iter().enumerate().map(|(k, (nm, _))| {
            flat(&out[&format!("t{k}")]).iter().zip(w_dir[nm].f().iter()).map(|(a, b)| a * b).sum::<f64>()
        }).sum();
        if i == 0 {
            let err = (th - fd_t).abs() / fd_t.abs().max(1e-4);
            assert!(err < 1e-4, "{}: third-order directional derivative: {th} vs fd {fd_t}", c.name);
        }
    }
}

fn cases() -> Vec<Case> {
    use Dist::*;
    let s = |d: &[usize]| d.to_vec();
    let u = U(-1.5, 1.5);
    let pos = U(0.5, 2.0);
    vec![
        case("neg", vec![(s(&[3, 4]), u)], |g, x| g.neg(x[0])),
        case("exp", vec![(s(&[3, 4]), u)], |g, x| g.exp(x[0])),
        case("log", vec![(s(&[3, 4]), pos)], |g, x| g.log(x[0])),
        case("sqrt", vec![(s(&[3, 4]), pos)], |g, x| g.sqrt(x[0])),
        case("sigmoid", vec![(s(&[3, 4]), u)], |g, x| g.sigmoid(x[0])),
        case("tanh", vec![(s(&[3, 4]), u)], |g, x| g.tanh(x[0])),
        case("relu", vec![(s(&[3, 4]), u)], |g, x| g.relu(x[0])),
        case("abs", vec![(s(&[3, 4]), u)], |g, x| g.abs(x[0])),
        case("sign", vec![(s(&[3, 4]), u)], |g, x| { let sg = g.sign(x[0]); g.mul(sg, x[0]) }),
        case("asinh", vec![(s(&[3, 4]), U(-3.0, 3.0))], |g, x| g.asinh(x[0])),
        case("erf", vec![(s(&[3, 4]), u)], |g, x| g.erf(x[0])),
        case("add_broadcast", vec![(s(&[3, 4]), u), (s(&[4]), u)], |g, x| g.add(x[0], x[1])),
        case("sub_broadcast", vec![(s(&[3, 1]), u), (s(&[1, 4]), u)], |g, x| g.sub(x[0], x[1])),
        case("mul_broadcast", vec![(s(&[2, 3, 4]), u), (s(&[3, 1]), u)], |g, x| g.mul(x[0], x[1])),
        case("div", vec![(s(&[3, 4]), u), (s(&[3, 4]), pos)], |g, x| g.div(x[0], x[1])),
        case("pow", vec![(s(&[3, 4]), pos), (s(&[3, 4]), U(-1.0, 2.0))], |g, x| g.pow(x[0], x[1])),
        case("min", vec![(s(&[3, 4]), u), (s(&[3, 4]), u)], |g, x| g.min(x[0], x[1])),
        case("max", vec![(s(&[3, 4]), u), (s(&[4]), u)], |g, x| g.max(x[0], x[1])),
        case("where_compare", vec![(s(&[3, 4]), u), (s(&[3, 4]), u)], |g, x| {
            let c = g.less(x[0], x[1]);
            let a = g.mul(x[0], x[1]);
            let b = g.exp(x[1]);
            g.where_(c, a, b)
        }),
        case("greater_equal_not_cast", vec![(s(&[3, 4]), u)], |g, x| {
            let z = g.scalar(0.0);
            let gt = g.greater(x[0], z);
            let eq = g.equal(x[0], x[0]);
            let ng = g.not(gt);
            let m = g.where_(eq, ng, gt);
            let f = g.cast(m, DType::F32);
            let e = g.exp(x[0]);
            g.mul(f, e)
        }),
        case("matmul", vec![(s(&[3, 4]), u), (s(&[4, 5]), u)], |g, x| g.matmul(x[0], x[1])),
        case("matmul_batched", vec![(s(&[2, 3, 4]), u), (s(&[2, 4, 2]), u)], |g, x| g.matmul(x[0], x[1])),
        case("matmul_broadcast_weight", vec![(s(&[2, 3, 4]), u), (s(&[4, 2]), u)], |g, x| g.matmul(x[0], x[1])),
        case("matmul_broadcast_batch", vec![(s(&[2, 1, 3, 4]), u), (s(&[3, 4, 2]), u)], |g, x| g.matmul(x[0], x[1])),
        case("reduce_sum", vec![(s(&[2, 3, 4]), u)], |g, x| g.sum(x[0], &[0, 2], false)),
        case("reduce_mean_keep", vec![(s(&[2, 3, 4]), u)], |g, x| g.mean(x[0], &[1], true)),
        case("reduce_max", vec![(s(&[2, 3, 4]), u)], |g, x| g.reduce_max(x[0], &[2], false)),
        case("reshape", vec![(s(&[2, 6]), u)], |g, x| { let r = g.reshape(x[0], &[3, 4]); g.exp(r) }),
        case("transpose", vec![(s(&[2, 3, 4]), u)], |g, x| g.transpose(x[0], &[2, 0, 1])),
        case("concat", vec![(s(&[2, 3]), u), (s(&[2, 2]), u)], |g, x| g.concat(&[x[0], x[1], x[0]], 1)),
        case("slice", vec![(s(&[4, 5]), u)], |g, x| g.slice(x[0], 1, 1, 4)),
        case("gather", vec![(s(&[5, 3]), u), (s(&[2, 4]), Idx(5))], |g, x| g.gather(x[0], x[1], 0)),
        case("gather_axis1", vec![(s(&[2, 5, 3]), u), (s(&[4]), Idx(5))], |g, x| g.gather(x[0], x[1], 1)),
        case("expand", vec![(s(&[3, 1]), u)], |g, x| g.expand(x[0], &[2, 3, 4])),
        case("softmax", vec![(s(&[3, 4]), u)], |g, x| g.softmax(x[0], 1)),
        case("softmax_axis0", vec![(s(&[3, 4]), u)], |g, x| g.softmax(x[0], 0)),
        case("log_softmax", vec![(s(&[3, 4]), u)], |g, x| g.log_softmax(x[0], 1)),
        case("cross_entropy", vec![(s(&[4, 5]), u), (s(&[4]), Idx(5))], |g, x| g.softmax_cross_entropy(x[0], x[1])),
        case("conv2d", vec![(s(&[2, 2, 5, 5]), u), (s(&[3, 2, 3, 3]), u)], |g, x| g.conv2d(x[0], x[1], ConvParams::default())),
        case("conv2d_stride_pad", vec![(s(&[1, 2, 6, 5]), u), (s(&[2, 2, 3, 2]), u)], |g, x| {
            g.conv2d(x[0], x[1], ConvParams { stride: [2, 2], pads: [1, 0, 1, 1], dilation: [1, 1] })
        }),
        case("conv2d_dilation", vec![(s(&[1, 1, 7, 7]), u), (s(&[2, 1, 2, 3]), u)], |g, x| {
            g.conv2d(x[0], x[1], ConvParams { stride: [1, 2], pads: [1, 1, 0, 1], dilation: [2, 2] })
        }),
        case("conv_transpose", vec![(s(&[1, 2, 3, 3]), u), (s(&[2, 3, 3, 3]), u)], |g, x| {
            metac_graphs::ops::conv::conv_transpose_to(g, x[0], x[1], &ConvParams { stride: [2, 2], pads: [1, 1, 1, 1], dilation: [1, 1] }, [6, 5])
        }),
    ]
}

#[test]
fn every_op_gradient_hvp_and_third_order_match_finite_differences() {
    let mut failures = vec![];
    for c in cases() {
        for optimized in [false, true] {
            if let Err(e) = std::panic::catch_unwind(|| check(&c, optimized)) {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{:?}", e.downcast_ref::<&str>()));
                failures.push(format!("[{}{}] {msg}", c.name, if optimized { ", optimized" } else { "" }));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn every_op_is_covered_by_a_gradient_check() {
    // The op names the cases above exercise; a new op must be added here.
    let mut seen = std::collections::BTreeSet::new();
    for c in cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let h = harness(&c, &mut rng);
        for n in h.g.nodes() { seen.insert(n.op.name()); }
    }
    seen.insert("StopGradient"); // checked in stop_gradient_blocks_derivatives
    let all = ["Input", "Const", "Fill", "Neg", "Exp", "Log", "Sqrt", "Sigmoid", "Tanh", "Relu", "Abs", "Sign", "Asinh", "Erf", "Not",
        "Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Less", "Greater", "Equal", "Where", "Cast", "StopGradient", "MatMul",
        "ReduceSum", "ReduceMean", "ReduceMax", "Reshape", "Transpose", "Concat", "Slice", "Gather", "Expand", "Softmax", "LogSoftmax",
        "Conv2d", "ConvTranspose2d"];
    let missing: Vec<_> = all.iter().filter(|n| !seen.contains(**n)).collect();
    assert!(missing.is_empty(), "ops without a gradient check: {missing:?}");
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
        ("x".to_string(), Value::F(ArrayD::from_shape_vec(IxDyn(&[4]), xs.to_vec()).unwrap())),
        ("v".to_string(), Value::F(ArrayD::from_shape_vec(IxDyn(&[4]), vs.to_vec()).unwrap())),
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
