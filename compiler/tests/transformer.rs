//! The GPT-style language model on the builder: its shapes, causality, loss,
//! and its gradient and HVP against central finite differences in f64 (the
//! reference interpreter), untied and tied head.

use std::collections::HashMap;

use metac_compiler::models::moe;
use metac_compiler::models::transformer::{Gpt, GptConfig};
use metac_contract::moe::MoeConfig;
use metac_graphs::autodiff::{grad, hvp_forward_over_reverse};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(tied: bool) -> Gpt {
    Gpt::new(GptConfig {
        vocab: 5,
        context: 4,
        width: 4,
        layers: 2,
        heads: 2,
        mlp_ratio: 2,
        tied_head: tied,
        moe: None,
        swiglu: None,
    })
    .unwrap()
}

const B: usize = 2;
const T: usize = 4;

/// The loss graph with its parameter and data inputs.
struct LossGraph {
    g: Graph,
    params: Vec<NodeId>,
    names: Vec<String>,
}

fn loss_graph(m: &Gpt) -> LossGraph {
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[B, T]);
    let targets = g.input("targets", DType::I64, &[B, T]);
    let weights = g.input("weights", DType::F32, &[B, T]);
    let loss = m.loss(&mut g, &params, tokens, targets, weights);
    g.output("loss", loss);
    let names = m.param_shapes().into_iter().map(|(n, _)| n).collect();
    LossGraph { g, params, names }
}

/// Random parameters large enough that every path matters (the GPT-2
/// initialisation's 0.02 leaves attention nearly uniform).
fn random_params(m: &Gpt, seed: u64) -> Vec<Value> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    m.param_shapes()
        .iter()
        .map(|(_, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f64> = (0..n).map(|_| r.random_range(-0.8..0.8)).collect();
            Value::F(ArrayD::from_shape_vec(IxDyn(s), v).unwrap())
        })
        .collect()
}

/// The logits graph `tokens [B, T] -> logits` and the parameter names.
fn logits_graph(m: &Gpt) -> (Graph, Vec<String>) {
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[B, T]);
    let logits = m.logits(&mut g, &params, tokens);
    g.output("logits", logits);
    let names = m.param_shapes().into_iter().map(|(n, _)| n).collect();
    (g, names)
}

fn lg_names(m: &Gpt) -> Vec<String> {
    m.param_shapes().into_iter().map(|(n, _)| n).collect()
}

fn data() -> HashMap<String, Value> {
    let i = |v: Vec<i64>| Value::from_tensor(&Tensor::i64(&[B, T], v));
    HashMap::from([
        ("tokens".to_string(), i(vec![0, 3, 1, 4, 2, 2, 0, 1])),
        ("targets".to_string(), i(vec![3, 1, 4, 0, 2, 0, 1, 3])),
        (
            "weights".to_string(),
            Value::from_tensor(&Tensor::f32(&[B, T], vec![0., 1., 1., 1., 1., 0., 1., 1.])),
        ),
    ])
}

fn feeds(names: &[String], params: &[Value]) -> HashMap<String, Value> {
    let mut f = data();
    for (n, v) in names.iter().zip(params) {
        f.insert(n.clone(), v.clone());
    }
    f
}

fn run(g: &Graph, f: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, f).unwrap().into_iter().collect()
}

fn scalar(v: &Value) -> f64 {
    v.f().iter().copied().next().unwrap()
}

fn axpy(x: &[Value], a: f64, d: &[Value]) -> Vec<Value> {
    x.iter()
        .zip(d)
        .map(|(x, d)| Value::F(x.f() + &(d.f() * a)))
        .collect()
}

fn dot(a: &[Value], b: &[Value]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| a.f().iter().zip(b.f()).map(|(x, y)| x * y).sum::<f64>())
        .sum()
}

#[test]
fn shapes_and_parameter_count() {
    let m = Gpt::new(GptConfig::reference(1000)).unwrap();
    let (d, l, v, c) = (128, 4, 1000, 16);
    let per_layer =
        2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d);
    assert_eq!(
        m.num_params(),
        v * d + c * d + l * per_layer + 2 * d + d * v
    );
    let tied = Gpt::new(GptConfig {
        tied_head: true,
        ..GptConfig::reference(1000)
    })
    .unwrap();
    assert_eq!(tied.num_params(), m.num_params() - d * v);
    assert!(!tied.param_shapes().iter().any(|(n, _)| n == "head.w"));
    let e = Gpt::new(GptConfig {
        heads: 3,
        ..GptConfig::reference(10)
    })
    .unwrap_err();
    assert!(e.contains("'width'") && e.contains("'heads'"), "{e}");
    let e = Gpt::new(GptConfig {
        layers: 0,
        ..GptConfig::reference(10)
    })
    .unwrap_err();
    assert!(e.contains("'layers'"), "{e}");
    // GPT-2's initialisation: gains 1, biases 0, residual projections smaller.
    let init = m.init_params(3);
    for ((n, s), t) in m.param_shapes().iter().zip(&init) {
        assert_eq!(&t.shape, s, "{n}");
        let v = t.as_f32().unwrap();
        if n.ends_with(".g") {
            assert!(v.iter().all(|&x| x == 1.0), "{n}");
        } else if n.ends_with(".b") {
            assert!(v.iter().all(|&x| x == 0.0), "{n}");
        } else {
            let sd = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let want = if n.ends_with("proj.w") {
                0.02 / 8f64.sqrt()
            } else {
                0.02
            };
            assert!((sd / want - 1.0).abs() < 0.1, "{n}: std {sd}, want {want}");
        }
    }
    assert_eq!(init, m.init_params(3));
    assert_ne!(init, m.init_params(4));
}

#[test]
fn a_position_sees_only_itself_and_the_past() {
    let m = tiny(false);
    let (g, names) = logits_graph(&m);
    let p = random_params(&m, 1);
    let at = |toks: Vec<i64>| {
        let mut f = feeds(&names, &p);
        f.insert(
            "tokens".into(),
            Value::from_tensor(&Tensor::i64(&[B, T], toks)),
        );
        run(&g, &f)["logits"].f().clone()
    };
    let a = at(vec![0, 3, 1, 4, 2, 2, 0, 1]);
    let b = at(vec![0, 3, 1, 2, 2, 2, 0, 1]); // the last token of sequence 0 differs
    assert_eq!(a.shape(), [B, T, 5]);
    for t in 0..T {
        let same = (0..5).all(|v| a[[0, t, v]] == b[[0, t, v]]);
        assert_eq!(same, t < T - 1, "position {t}");
        assert!((0..5).all(|v| a[[1, t, v]] == b[[1, t, v]]));
    }
}

#[test]
fn the_loss_is_the_weighted_mean_cross_entropy() {
    let m = tiny(false);
    let lg = loss_graph(&m);
    let mut g = lg.g.clone();
    let tokens = g.find_input("tokens").unwrap();
    let logits = m.logits(&mut g, &lg.params, tokens);
    g.output("logits", logits);
    let p = random_params(&m, 2);
    let out = run(&g, &feeds(&lg.names, &p));
    let lo = out["logits"].f();
    let d = data();
    let (tg, w) = (d["targets"].i(), d["weights"].f());
    let (mut sum, mut n) = (0.0, 0.0);
    for b in 0..B {
        for t in 0..T {
            let row: Vec<f64> = (0..5).map(|v| lo[[b, t, v]]).collect();
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            let nll = lse - row[tg[[b, t]] as usize];
            sum += w[[b, t]] * nll;
            n += w[[b, t]];
        }
    }
    let got = scalar(&out["loss"]);
    assert!((got - sum / n).abs() < 1e-12, "{got} vs {}", sum / n);
}

/// The tiny model with mixtures of 4 SwiGLU experts of width 3 (budget
/// 0.45, 1 to 3 experts per token) for MLPs.
fn tiny_moe() -> Gpt {
    Gpt::new(GptConfig {
        moe: Some(MoeConfig {
            experts: 4,
            hidden: 3,
            budget: 0.45,
            min_k: 1,
            max_k: Some(3),
        }),
        ..tiny(false).config
    })
    .unwrap()
}

/// The tiny model with dense SwiGLU MLPs of width 6.
fn tiny_swiglu() -> Gpt {
    Gpt::new(GptConfig {
        swiglu: Some(6),
        ..tiny(false).config
    })
    .unwrap()
}

fn check_derivatives(tied: bool) {
    check_model_derivatives(&tiny(tied), &format!("tied {tied}"));
}

fn check_model_derivatives(m: &Gpt, label: &str) {
    let tied = label;
    let lg = loss_graph(m);
    let mut g = lg.g.clone();
    let loss = g.find_output("loss").unwrap();
    let grads = grad(&mut g, loss, &lg.params);
    let vs: Vec<NodeId> = m
        .param_shapes()
        .iter()
        .map(|(n, s)| g.input(&format!("v.{n}"), DType::F32, s))
        .collect();
    let hv = hvp_forward_over_reverse(&mut g, loss, &lg.params, &vs);
    for (k, (&gr, &h)) in grads.iter().zip(&hv).enumerate() {
        g.output(&format!("g{k}"), gr);
        g.output(&format!("h{k}"), h);
    }
    let p = random_params(m, 5);
    let dir = random_params(m, 6);
    let with_dir = |p: &[Value]| {
        let mut f = feeds(&lg.names, p);
        for ((n, _), v) in m.param_shapes().iter().zip(&dir) {
            f.insert(format!("v.{n}"), v.clone());
        }
        run(&g, &f)
    };
    let out = with_dir(&p);
    let n = p.len();
    let gvec: Vec<Value> = (0..n).map(|k| out[&format!("g{k}")].clone()).collect();
    let hvec: Vec<Value> = (0..n).map(|k| out[&format!("h{k}")].clone()).collect();
    let h = 1e-5;
    let (plus, minus) = (with_dir(&axpy(&p, h, &dir)), with_dir(&axpy(&p, -h, &dir)));
    // The directional derivative of the loss.
    let fd = (scalar(&plus["loss"]) - scalar(&minus["loss"])) / (2.0 * h);
    let an = dot(&gvec, &dir);
    assert!(
        (fd - an).abs() <= 1e-7 * an.abs().max(1e-3),
        "{tied}: gradient . v = {an}, finite differences {fd}"
    );
    // Every parameter's gradient moves: no parameter is cut off.
    for (k, gk) in gvec.iter().enumerate() {
        assert!(
            gk.f().iter().any(|&x| x != 0.0),
            "{tied}: zero gradient of {}",
            lg.names[k]
        );
    }
    // H v against finite differences of the gradient, parameter by parameter.
    for k in 0..n {
        let fdh = (plus[&format!("g{k}")].f() - minus[&format!("g{k}")].f()) / (2.0 * h);
        let an = hvec[k].f();
        let err = (&fdh - an).iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = an.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
        assert!(
            err <= 1e-6 * scale,
            "{tied}: H v of {}: error {err}, scale {scale}",
            lg.names[k]
        );
    }
}

#[test]
fn gradient_and_hvp_match_finite_differences() {
    check_derivatives(false);
}

#[test]
fn tied_head_gradient_and_hvp_match_finite_differences() {
    check_derivatives(true);
}

#[test]
fn mixture_of_experts_gradient_and_hvp_match_finite_differences() {
    let m = tiny_moe();
    // The selection is a real one at the point checked: tokens take
    // different numbers of experts (a mask that changed between the finite
    // differences' points would fail the check instead).
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[B, T]);
    let (_, layers) = m.trunk_moe(&mut g, &params, tokens);
    assert_eq!(layers.len(), 2);
    for (l, layer) in layers.iter().enumerate() {
        g.output(&format!("active{l}"), layer.active);
    }
    let out = run(&g, &feeds(&lg_names(&m), &random_params(&m, 5)));
    let ks: Vec<std::collections::BTreeSet<i64>> = (0..2)
        .map(|l| {
            let a = out[&format!("active{l}")].f();
            a.rows()
                .into_iter()
                .map(|r| r.sum().round() as i64)
                .collect()
        })
        .collect();
    assert!(
        ks.iter().any(|k| k.len() > 1) && ks.iter().flatten().all(|&k| (1..=3).contains(&k)),
        "experts per token, by layer: {ks:?}"
    );
    check_model_derivatives(&m, "moe");
}

#[test]
fn the_hyper_steps_custom_backward_is_reverse_mode_with_the_surprise() {
    // main_backward (experts' data path by hand, from the surprise's
    // J_e^T dy) against plain reverse mode and moe::surprise, in f64.
    let m = tiny_moe();
    let cfg = m.config.moe.clone().unwrap();
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[B, T]);
    let targets = g.input("targets", DType::I64, &[B, T]);
    let weights = g.input("weights", DType::F32, &[B, T]);
    let names = lg_names(&m);
    let main: Vec<NodeId> = params
        .iter()
        .zip(&names)
        .filter(|(_, n)| !metac_compiler::moe::is_router_param(n))
        .map(|(&p, _)| p)
        .collect();
    let (loss, layers) = m.loss_moe_with(&mut g, &params, tokens, targets, weights, true);
    let (grads, sur) = metac_compiler::moe::main_backward(&mut g, &m, loss, &layers, &main);
    let (loss2, layers2) = m.loss_moe(&mut g, &params, tokens, targets, weights);
    let grads2 = grad(&mut g, loss2, &main);
    let outs: Vec<NodeId> = layers2.iter().map(|l| l.output).collect();
    let seed = g.fill(1.0, DType::F32, &[]);
    let dys = metac_graphs::autodiff::vjp(&mut g, &[(loss2, seed)], &outs);
    for (k, (&a, &b)) in grads.iter().zip(&grads2).enumerate() {
        g.output(&format!("a{k}"), a);
        g.output(&format!("b{k}"), b);
    }
    for (l, (layer, dy)) in layers2.iter().zip(dys).enumerate() {
        let s2 = moe::surprise(&mut g, layer, &cfg, dy.unwrap());
        g.output(&format!("sa{l}"), sur[l]);
        g.output(&format!("sb{l}"), s2);
    }
    let out = run(&g, &feeds(&names, &random_params(&m, 5)));
    let close = |a: &str, b: &str| {
        let (x, y) = (out[a].f(), out[b].f());
        let err = (x - y).iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(
            scale > 0.0 && err <= 1e-10 * scale,
            "{a}: error {err}, scale {scale}"
        );
    };
    for k in 0..grads.len() {
        close(&format!("a{k}"), &format!("b{k}"));
    }
    for l in 0..layers.len() {
        close(&format!("sa{l}"), &format!("sb{l}"));
    }
}

#[test]
fn dense_swiglu_gradient_and_hvp_match_finite_differences() {
    check_model_derivatives(&tiny_swiglu(), "swiglu");
}

/// The same model written directly in f64 loops (no graph): embeddings,
/// pre-LN blocks of causal attention and GELU MLP, final norm, head.
fn reference_logits(m: &Gpt, p: &[Value], tokens: &[i64]) -> Vec<f64> {
    let c = &m.config;
    let names: Vec<String> = m.param_shapes().into_iter().map(|(n, _)| n).collect();
    let get = |n: &str| -> Vec<f64> {
        let i = names.iter().position(|x| x == n).unwrap();
        p[i].f().iter().copied().collect()
    };
    let (d, nh, v) = (c.width, c.heads, c.vocab);
    let dh = d / nh;
    let hid = d * c.mlp_ratio;
    let linear = |x: &[f64], w: &[f64], b: &[f64], n_in: usize, n_out: usize| -> Vec<f64> {
        let rows = x.len() / n_in;
        let mut y = vec![0.0; rows * n_out];
        for r in 0..rows {
            for o in 0..n_out {
                let mut s = b.get(o).copied().unwrap_or(0.0);
                for i in 0..n_in {
                    s += x[r * n_in + i] * w[i * n_out + o];
                }
                y[r * n_out + o] = s;
            }
        }
        y
    };
    let norm = |x: &[f64], g: &[f64], b: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (r, row) in x.chunks(d).enumerate() {
            let mu = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|a| (a - mu).powi(2)).sum::<f64>() / d as f64;
            let sd = (var + f64::from(1e-5_f32)).sqrt();
            for i in 0..d {
                y[r * d + i] = (row[i] - mu) / sd * g[i] + b[i];
            }
        }
        y
    };
    let erf = |x: f64| libm::erf(x);
    let t = tokens.len() / B;
    let (tok, pos) = (get("tok_emb"), get("pos_emb"));
    let mut x = vec![0.0; B * t * d];
    for b in 0..B {
        for s in 0..t {
            let id = tokens[b * t + s] as usize;
            for i in 0..d {
                x[(b * t + s) * d + i] = tok[id * d + i] + pos[s * d + i];
            }
        }
    }
    for l in 0..c.layers {
        let q = |n: &str| get(&format!("l{l}.{n}"));
        let h = norm(&x, &q("ln1.g"), &q("ln1.b"));
        let z = linear(&h, &q("attn.qkv.w"), &q("attn.qkv.b"), d, 3 * d);
        let mut y = vec![0.0; B * t * d];
        for b in 0..B {
            for hd in 0..nh {
                for i in 0..t {
                    let qi = |k: usize| z[(b * t + i) * 3 * d + hd * dh + k];
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..dh)
                                .map(|k| qi(k) * z[(b * t + j) * 3 * d + d + hd * dh + k])
                                .sum::<f64>()
                                * f64::from(1.0 / (dh as f32).sqrt())
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let tot: f64 = e.iter().sum();
                    for k in 0..dh {
                        y[(b * t + i) * d + hd * dh + k] = (0..=i)
                            .map(|j| e[j] / tot * z[(b * t + j) * 3 * d + 2 * d + hd * dh + k])
                            .sum();
                    }
                }
            }
        }
        let a = linear(&y, &q("attn.proj.w"), &q("attn.proj.b"), d, d);
        for (xi, ai) in x.iter_mut().zip(&a) {
            *xi += ai;
        }
        let h = norm(&x, &q("ln2.g"), &q("ln2.b"));
        let h = linear(&h, &q("mlp.fc.w"), &q("mlp.fc.b"), d, hid);
        let h: Vec<f64> = h
            .iter()
            .map(|&u| 0.5 * u * (1.0 + erf(u * f64::from(std::f32::consts::FRAC_1_SQRT_2))))
            .collect();
        let o = linear(&h, &q("mlp.proj.w"), &q("mlp.proj.b"), hid, d);
        for (xi, oi) in x.iter_mut().zip(&o) {
            *xi += oi;
        }
    }
    let x = norm(&x, &get("ln_f.g"), &get("ln_f.b"));
    let head = if c.tied_head {
        // tok_emb^T: [d, V]
        let mut h = vec![0.0; d * v];
        for a in 0..v {
            for i in 0..d {
                h[i * v + a] = tok[a * d + i];
            }
        }
        h
    } else {
        get("head.w")
    };
    linear(&x, &head, &[], d, v)
}

#[test]
fn logits_match_a_direct_f64_implementation() {
    for tied in [false, true] {
        let m = tiny(tied);
        let (g, names) = logits_graph(&m);
        let p = random_params(&m, 9);
        let got: Vec<f64> = run(&g, &feeds(&names, &p))["logits"]
            .f()
            .iter()
            .copied()
            .collect();
        let toks: Vec<i64> = data()["tokens"].i().iter().copied().collect();
        let want = reference_logits(&m, &p, &toks);
        assert_eq!(got.len(), want.len());
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "tied {tied}: max difference {err}");
    }
}

/// The answer-token form used for facts: logits at one position per
/// sequence are those of the full logits there; the loss is the mean
/// answer NLL, `correct` marks answers ranked first, and the loss's
/// gradient matches finite differences (tied head: the embedding gets
/// gradient from both ends).
#[test]
fn answer_scores_and_loss_at_positions() {
    let m = tiny(true);
    let mut g = Graph::new();
    let params = m.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[B, T]);
    let positions = g.input("positions", DType::I64, &[B]);
    let answers = g.input("answers", DType::I64, &[B]);
    let full = m.logits(&mut g, &params, tokens);
    let at = m.logits_at(&mut g, &params, tokens, positions);
    let (nll, correct) = m.answer_scores(&mut g, &params, tokens, positions, answers);
    let loss = m.answer_loss(&mut g, &params, tokens, positions, answers);
    let grads = grad(&mut g, loss, &params);
    g.output("full", full);
    g.output("at", at);
    g.output("nll", nll);
    g.output("correct", correct);
    g.output("loss", loss);
    for (k, &gr) in grads.iter().enumerate() {
        g.output(&format!("g{k}"), gr);
    }
    let names: Vec<String> = m.param_shapes().into_iter().map(|(n, _)| n).collect();
    let p = random_params(&m, 8);
    let (pos, ans) = ([2i64, 3], [4i64, 1]);
    let feed = |p: &[Value]| {
        let mut f = feeds(&names, p);
        f.insert(
            "positions".into(),
            Value::from_tensor(&Tensor::i64(&[B], pos.to_vec())),
        );
        f.insert(
            "answers".into(),
            Value::from_tensor(&Tensor::i64(&[B], ans.to_vec())),
        );
        run(&g, &f)
    };
    let out = feed(&p);
    let (full, at) = (out["full"].f(), out["at"].f());
    let mut mean = 0.0;
    for b in 0..B {
        let row: Vec<f64> = (0..5).map(|v| full[[b, pos[b] as usize, v]]).collect();
        for v in 0..5 {
            assert_eq!(at[[b, v]], row[v], "sequence {b}, token {v}");
        }
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        let nll = lse - row[ans[b] as usize];
        assert!((out["nll"].f()[[b]] - nll).abs() < 1e-12);
        let top = row[ans[b] as usize] == mx;
        assert_eq!(out["correct"].f()[[b]], if top { 1.0 } else { 0.0 });
        mean += nll / B as f64;
    }
    assert!((scalar(&out["loss"]) - mean).abs() < 1e-12);
    let dir = random_params(&m, 9);
    let h = 1e-5;
    let fd = (scalar(&feed(&axpy(&p, h, &dir))["loss"])
        - scalar(&feed(&axpy(&p, -h, &dir))["loss"]))
        / (2.0 * h);
    let gvec: Vec<Value> = (0..p.len())
        .map(|k| out[&format!("g{k}")].clone())
        .collect();
    let an = dot(&gvec, &dir);
    assert!(
        (fd - an).abs() <= 1e-7 * an.abs().max(1e-3),
        "gradient . v = {an}, finite differences {fd}"
    );
}
