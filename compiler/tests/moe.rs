//! The mixture of experts' pieces in f64 (the reference interpreter): the
//! selection rule, the surprise against autodiff of each expert alone, and
//! the consistency of the router loss with the selection.

use std::collections::HashMap;

use metac_compiler::models::moe::{self, MoeLayer, MoeParams, RouterLossWeights};
use metac_contract::moe::MoeConfig;
use metac_graphs::autodiff::grad;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cfg(experts: usize, budget: f64, min_k: usize, max_k: usize) -> MoeConfig {
    MoeConfig {
        experts,
        hidden: 3,
        budget,
        min_k,
        max_k: Some(max_k),
    }
}

fn f(shape: &[usize], v: Vec<f64>) -> Value {
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn random(shape: &[usize], r: &mut ChaCha8Rng) -> Value {
    let n = shape.iter().product();
    f(shape, (0..n).map(|_| r.random_range(-1.0..1.0)).collect())
}

fn run(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, feeds).unwrap().into_iter().collect()
}

/// The active mask of `probs` under `c`.
fn active(probs: Vec<f64>, c: &MoeConfig) -> Vec<f64> {
    let e = c.experts;
    let n = probs.len() / e;
    let mut g = Graph::new();
    let p = g.input("p", DType::F32, &[n, e]);
    let a = moe::select(&mut g, p, c);
    g.output("a", a);
    let out = run(&g, &HashMap::from([("p".to_string(), f(&[n, e], probs))]));
    out["a"].f().iter().copied().collect()
}

#[test]
fn experts_are_taken_in_decreasing_probability_up_to_the_budget() {
    let p = vec![0.1, 0.5, 0.3, 0.1];
    // 0.5 first (nothing before it), then 0.3 (0.5 before it, under 0.6);
    // 0.1 and 0.1 have 0.8 and 0.9 before them.
    assert_eq!(active(p.clone(), &cfg(4, 0.6, 1, 4)), [0., 1., 1., 0.]);
    assert_eq!(active(p.clone(), &cfg(4, 0.5, 1, 4)), [0., 1., 0., 0.]);
    // min_k forces a third: of the tied 0.1s, the lower index comes first.
    assert_eq!(active(p.clone(), &cfg(4, 0.5, 3, 4)), [1., 1., 1., 0.]);
    // max_k caps the budget's choice.
    assert_eq!(active(p.clone(), &cfg(4, 0.95, 1, 2)), [0., 1., 1., 0.]);
    // A budget of 1 with min_k = max_k = k is top-k.
    assert_eq!(active(p.clone(), &cfg(4, 1.0, 2, 2)), [0., 1., 1., 0.]);
    assert_eq!(active(p, &cfg(4, 1.0, 4, 4)), [1., 1., 1., 1.]);
    // Uniform probabilities: ties in index order.
    assert_eq!(active(vec![0.25; 4], &cfg(4, 0.6, 1, 4)), [1., 1., 1., 0.]);
}

struct Block {
    g: Graph,
    layer: MoeLayer,
    feeds: HashMap<String, Value>,
}

/// A mixture of `e` experts of width 3 on `n` random tokens of width `d`.
fn block(n: usize, d: usize, c: &MoeConfig, seed: u64) -> Block {
    let (e, h) = (c.experts, c.hidden);
    let mut g = Graph::new();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = HashMap::new();
    let mut input = |g: &mut Graph, name: &str, shape: &[usize]| {
        feeds.insert(name.to_string(), random(shape, &mut r));
        g.input(name, DType::F32, shape)
    };
    let x = input(&mut g, "x", &[n, d]);
    let p = MoeParams {
        wr: input(&mut g, "wr", &[d, e]),
        br: input(&mut g, "br", &[e]),
        w1: input(&mut g, "w1", &[d, e * h]),
        w3: input(&mut g, "w3", &[d, e * h]),
        w2: input(&mut g, "w2", &[e * h, d]),
    };
    let _dy = input(&mut g, "dy", &[n, d]);
    let layer = moe::block(&mut g, x, &p, c, false);
    Block { g, layer, feeds }
}

#[test]
fn surprise_is_the_norm_of_each_expert_alone_input_gradient() {
    let (n, d) = (5, 4);
    let c = cfg(3, 0.5, 1, 2);
    let h = c.hidden;
    let Block {
        mut g,
        layer,
        feeds,
    } = block(n, d, &c, 7);
    let dy = g.find_input("dy").unwrap();
    let s = moe::surprise(&mut g, &layer, &c, dy);
    g.output("s", s);
    // Reference: expert e's SwiGLU on its own weights, and the gradient of
    // <dy, y_e> with respect to its input (row t is J_e(x_t)^T dy_t).
    for e in 0..c.experts {
        let w1 = g.slice(layer.w1, 1, e * h, (e + 1) * h);
        let w3 = g.slice(layer.w3, 1, e * h, (e + 1) * h);
        let w2 = g.slice(layer.w2, 0, e * h, (e + 1) * h);
        let y = moe::swiglu(&mut g, layer.input, w1, w3, w2);
        let dot = g.mul(y, dy);
        let dot = g.sum_all(dot);
        let dx = grad(&mut g, dot, &[layer.input])[0];
        g.output(&format!("dx{e}"), dx);
    }
    let out = run(&g, &feeds);
    let s = out["s"].f();
    assert_eq!(s.shape(), [n, c.experts]);
    let mut spread = 0.0f64;
    for e in 0..c.experts {
        let dx = out[&format!("dx{e}")].f();
        for t in 0..n {
            let want = (0..d).map(|i| dx[[t, i]].powi(2)).sum::<f64>().sqrt();
            let got = s[[t, e]];
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "token {t}, expert {e}: {got} vs {want}"
            );
            spread = spread.max((s[[t, e]] - s[[t, 0]]).abs());
        }
    }
    // Experts differ, inactive ones included (2 of 3 at most are active).
    assert!(spread > 1e-3, "surprise does not tell experts apart");
}

/// Router loss terms of a block whose surprise is the input `s`.
fn router_graph(n: usize, c: &MoeConfig) -> (Graph, NodeId, NodeId) {
    let mut g = Graph::new();
    let logits = g.input("logits", DType::F32, &[n, c.experts]);
    let s = g.input("s", DType::F32, &[n, c.experts]);
    let probs = g.softmax(logits, 1);
    let active = moe::select(&mut g, probs, c);
    let w = g.constant(Tensor::f32(&[n], vec![1.0; n]));
    let zero = g.scalar(0.0);
    let opts = RouterLossWeights {
        kl: zero,
        tau: 1.0,
        k_penalty: zero,
    };
    let t = moe::router_loss(&mut g, logits, active, s, w, &opts);
    let dl = grad(&mut g, t.loss, &[logits])[0];
    g.output("loss", t.loss);
    g.output("accuracy", t.gating_accuracy);
    g.output("mean_k", t.mean_k);
    g.output("dlogits", dl);
    g.output("probs", probs);
    g.output("active", active);
    (g, logits, s)
}

#[test]
fn a_router_step_moves_the_least_surprised_expert_forward_until_it_is_selected() {
    let (n, e) = (6, 5);
    let c = cfg(e, 0.5, 1, 3);
    let (g, _, _) = router_graph(n, &c);
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let mut logits: Vec<f64> = (0..n * e).map(|_| r.random_range(-2.0..2.0)).collect();
    // The least-surprised expert of each token is its least probable one:
    // never selected at the start, so the gating accuracy is 0.
    let rank_of = |l: &[f64], t: usize, j: usize| {
        let row = &l[t * e..(t + 1) * e];
        (0..e)
            .filter(|&k| row[k] > row[j] || (row[k] == row[j] && k < j))
            .count()
    };
    let targets: Vec<usize> = (0..n)
        .map(|t| (0..e).find(|&j| rank_of(&logits, t, j) == e - 1).unwrap())
        .collect();
    let mut s = vec![1.0; n * e];
    for (t, &j) in targets.iter().enumerate() {
        s[t * e + j] = 0.5;
    }
    let feeds = |l: &[f64]| {
        HashMap::from([
            ("logits".to_string(), f(&[n, e], l.to_vec())),
            ("s".to_string(), f(&[n, e], s.clone())),
        ])
    };
    let out = run(&g, &feeds(&logits));
    assert_eq!(out["accuracy"].f().iter().next().copied(), Some(0.0));
    let mut ranks: Vec<usize> = targets
        .iter()
        .enumerate()
        .map(|(t, &j)| rank_of(&logits, t, j))
        .collect();
    for _ in 0..200 {
        let out = run(&g, &feeds(&logits));
        if out["accuracy"].f().iter().next().copied() == Some(1.0) {
            break;
        }
        let dl = out["dlogits"].f();
        for (k, v) in logits.iter_mut().enumerate() {
            *v -= 2.0 * dl[[k / e, k % e]];
        }
        // Every step keeps or improves each target's place in the order.
        for (t, &j) in targets.iter().enumerate() {
            let now = rank_of(&logits, t, j);
            assert!(now <= ranks[t], "token {t}: rank {} -> {now}", ranks[t]);
            ranks[t] = now;
        }
    }
    let out = run(&g, &feeds(&logits));
    assert_eq!(out["accuracy"].f().iter().next().copied(), Some(1.0));
    let a = out["active"].f();
    for (t, &j) in targets.iter().enumerate() {
        assert_eq!(a[[t, j]], 1.0, "token {t}");
        assert_eq!(ranks[t], 0, "token {t}: the target leads");
    }
}
