//! The Hessian regularisers' values against a dense Hessian of a small
//! non-quadratic loss (8 parameters), evaluated with the f64 interpreter:
//! `jacob`, `hessian-ev` (k power steps) and `hessian-esd` (Lanczos) exactly
//! against the same algorithms on the dense matrix, Lanczos with m = n
//! against the trace, long power iteration against the top eigenvalue, and
//! Hutchinson per draw exactly and over many draws statistically.

use std::collections::HashMap;

use metac_compiler::l2o::regularizer::{RegOption, RegularizerSpec};
use metac_graphs::autodiff::{grad, hvp_forward_over_reverse};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [&[usize]; 2] = [&[3, 2], &[2]];
const N: usize = 8;

/// `L = sum(tanh(X W + b)^2) + 0.1 sum(W^3)` with a fixed `X [4, 3]`:
/// a dense, indefinite Hessian.
fn loss_graph() -> (Graph, Vec<NodeId>, NodeId) {
    let mut g = Graph::new();
    let w = g.input("w", DType::F32, SHAPES[0]);
    let b = g.input("b", DType::F32, SHAPES[1]);
    let x = g.constant(Tensor::f32(
        &[4, 3],
        vec![
            0.5, -1.0, 0.3, 1.2, 0.1, -0.7, -0.4, 0.9, 0.8, 0.2, -0.3, -1.1,
        ],
    ));
    let z = g.matmul(x, w);
    let z = g.add(z, b);
    let t = g.tanh(z);
    let t2 = g.square(t);
    let a = g.sum_all(t2);
    let w2 = g.mul(w, w);
    let w3 = g.mul(w2, w);
    let c = g.sum_all(w3);
    let c = g.mul_scalar(c, 0.1);
    let l = g.add(a, c);
    (g, vec![w, b], l)
}

fn point() -> HashMap<String, Value> {
    let mut m = HashMap::new();
    m.insert(
        "w".into(),
        Value::from_tensor(&Tensor::f32(&[3, 2], vec![0.3, -0.5, 0.8, 0.1, -0.6, 0.4])),
    );
    m.insert(
        "b".into(),
        Value::from_tensor(&Tensor::f32(&[2], vec![0.2, -0.1])),
    );
    m
}

fn flat(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

fn scalar(v: &Value) -> f64 {
    flat(v)[0]
}

/// The dense Hessian at `point()`, column by column from HVPs with unit vectors.
fn dense_hessian() -> Vec<Vec<f64>> {
    let (mut g, theta, l) = loss_graph();
    let v: Vec<NodeId> = SHAPES
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("v{k}"), DType::F32, s))
        .collect();
    let hv = hvp_forward_over_reverse(&mut g, l, &theta, &v);
    g.set_outputs(vec![("hv0".into(), hv[0]), ("hv1".into(), hv[1])]);
    (0..N)
        .map(|j| {
            let mut feeds = point();
            let mut e = [0.0f32; N];
            e[j] = 1.0;
            feeds.insert(
                "v0".into(),
                Value::from_tensor(&Tensor::f32(&[3, 2], e[..6].to_vec())),
            );
            feeds.insert(
                "v1".into(),
                Value::from_tensor(&Tensor::f32(&[2], e[6..].to_vec())),
            );
            let out: HashMap<String, Value> = eval_graph(&g, &feeds).unwrap().into_iter().collect();
            flat(&out["hv0"])
                .into_iter()
                .chain(flat(&out["hv1"]))
                .collect()
        })
        .collect()
}

fn matvec(h: &[Vec<f64>], v: &[f64]) -> Vec<f64> {
    // h is symmetric: column j = row j.
    (0..N)
        .map(|i| (0..N).map(|j| h[j][i] * v[j]).sum())
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalized(v: &[f64]) -> Vec<f64> {
    let n = (dot(v, v) + f64::from(1e-30f32)).sqrt();
    v.iter().map(|x| x / n).collect()
}

/// The regulariser graph with probes `[P, *shape]` as inputs `p0`, `p1`.
fn reg_value(spec: RegularizerSpec, probes: &[Vec<f64>]) -> f64 {
    let (mut g, theta, l) = loss_graph();
    let grads = grad(&mut g, l, &theta);
    let p = probes.len();
    let pin: Vec<NodeId> = SHAPES
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let shape: Vec<usize> = std::iter::once(p).chain(s.iter().copied()).collect();
            g.input(&format!("p{k}"), DType::F32, &shape)
        })
        .collect();
    let r = spec.build(&mut g, &theta, &grads, &pin).unwrap();
    g.set_outputs(vec![("reg".into(), r)]);
    let mut feeds = point();
    let split = |lo: usize, hi: usize| -> Vec<f32> {
        probes
            .iter()
            .flat_map(|v| v[lo..hi].iter().map(|&x| x as f32))
            .collect()
    };
    feeds.insert(
        "p0".into(),
        Value::from_tensor(&Tensor::f32(&[p, 3, 2], split(0, 6))),
    );
    feeds.insert(
        "p1".into(),
        Value::from_tensor(&Tensor::f32(&[p, 2], split(6, 8))),
    );
    let out = eval_graph(&g, &feeds).unwrap();
    scalar(&out[0].1)
}

fn spec(option: RegOption, probes: usize, k: usize, m: usize) -> RegularizerSpec {
    RegularizerSpec {
        option,
        num_probes: probes,
        power_iterations: k,
        lanczos_steps: m,
    }
}

/// Probe vectors rounded to f32, as the graph sees them.
fn random_probes(rng: &mut ChaCha8Rng, p: usize, rademacher: bool) -> Vec<Vec<f64>> {
    (0..p)
        .map(|_| {
            (0..N)
                .map(|_| {
                    if rademacher {
                        if rng.random::<bool>() {
                            1.0
                        } else {
                            -1.0
                        }
                    } else {
                        f64::from(rng.random_range(-1.0f32..1.0))
                    }
                })
                .collect()
        })
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

/// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations.
#[allow(clippy::needless_range_loop)] // rotations index rows and columns alike
fn eigenvalues(h: &[Vec<f64>]) -> Vec<f64> {
    let mut a: Vec<Vec<f64>> = h.to_vec();
    for _ in 0..100 {
        for p in 0..N {
            for q in p + 1..N {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..N {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..N {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..N).map(|i| a[i][i]).collect()
}

#[test]
fn jacob_is_the_mean_squared_gradient() {
    let (mut g, theta, l) = loss_graph();
    let grads = grad(&mut g, l, &theta);
    g.set_outputs(vec![("g0".into(), grads[0]), ("g1".into(), grads[1])]);
    let out: HashMap<String, Value> = eval_graph(&g, &point()).unwrap().into_iter().collect();
    let gv: Vec<f64> = flat(&out["g0"])
        .into_iter()
        .chain(flat(&out["g1"]))
        .collect();
    let want = dot(&gv, &gv) / N as f64;
    let got = reg_value(spec(RegOption::Jacob, 1, 1, 1), &[]);
    assert!(close(got, want, 1e-12), "{got} vs {want}");
}

#[test]
fn power_iteration_matches_the_dense_computation_and_converges() {
    let h = dense_hessian();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let start = random_probes(&mut rng, 1, false);
    for k in [1, 3, 7] {
        let mut v = normalized(&start[0]);
        let mut rq = 0.0;
        for _ in 0..k {
            let w = matvec(&h, &v);
            rq = dot(&v, &w);
            v = normalized(&w);
        }
        let got = reg_value(spec(RegOption::HessianEv, 1, k, 1), &start);
        assert!(close(got, rq, 1e-10), "k = {k}: {got} vs {rq}");
    }
    let ev = eigenvalues(&h);
    let top = ev
        .iter()
        .copied()
        .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
    let got = reg_value(spec(RegOption::HessianEv, 1, 300, 1), &start);
    println!("eigenvalues {ev:?}; power iteration (300) {got}");
    assert!(close(got, top, 1e-6), "{got} vs top eigenvalue {top}");
}

#[test]
fn lanczos_ritz_sum_matches_dense_lanczos_and_the_trace() {
    let h = dense_hessian();
    let trace: f64 = (0..N).map(|i| h[i][i]).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let start = random_probes(&mut rng, 1, false);
    for m in [1, 2, 4, N] {
        // Dense Lanczos with full reorthogonalisation, as in the graph.
        let mut basis = vec![normalized(&start[0])];
        let mut total = 0.0;
        let mut beta_prev: Option<f64> = None;
        for j in 0..m {
            let q = basis[j].clone();
            let mut w = matvec(&h, &q);
            let alpha = dot(&q, &w);
            total += alpha;
            if j + 1 == m {
                break;
            }
            for (x, y) in w.iter_mut().zip(&q) {
                *x -= alpha * y;
            }
            if let Some(b) = beta_prev {
                for (x, y) in w.iter_mut().zip(&basis[j - 1]) {
                    *x -= b * y;
                }
            }
            for qi in basis.clone() {
                let c = dot(&qi, &w);
                for (x, y) in w.iter_mut().zip(&qi) {
                    *x -= c * y;
                }
            }
            beta_prev = Some((dot(&w, &w) + f64::from(1e-30f32)).sqrt());
            basis.push(normalized(&w));
        }
        let got = reg_value(spec(RegOption::HessianEsd, 1, 1, m), &start);
        assert!(close(got, total, 1e-9), "m = {m}: {got} vs {total}");
        if m == N {
            assert!(close(got, trace, 1e-9), "m = n: {got} vs trace {trace}");
        }
    }
}

#[test]
fn hutchinson_is_exact_per_draw_and_unbiased() {
    let h = dense_hessian();
    let trace: f64 = (0..N).map(|i| h[i][i]).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let p = 4;
    let draws = 5000;
    let mut estimates = vec![];
    for d in 0..draws {
        let probes = random_probes(&mut rng, p, true);
        let want = probes.iter().map(|v| dot(v, &matvec(&h, v))).sum::<f64>() / p as f64;
        // The graph for every draw would be slow in the interpreter; check
        // exactness on a few, use the dense value for the statistics.
        if d < 5 {
            let got = reg_value(spec(RegOption::Hessian, p, 1, 1), &probes);
            assert!(close(got, want, 1e-10), "draw {d}: {got} vs {want}");
        }
        estimates.push(want);
    }
    // Var(v^T H v) = 2 (|H|_F^2 - sum_i H_ii^2) for Rademacher v.
    let frob: f64 = h.iter().flatten().map(|x| x * x).sum();
    let diag: f64 = (0..N).map(|i| h[i][i] * h[i][i]).sum();
    let sd = (2.0 * (frob - diag) / (p * draws) as f64).sqrt();
    let mean = estimates.iter().sum::<f64>() / draws as f64;
    println!("trace {trace}, Hutchinson mean of {draws} x {p} probes {mean} (sd {sd})");
    assert!(
        (mean - trace).abs() < 5.0 * sd,
        "{mean} vs {trace} (sd {sd})"
    );
}
