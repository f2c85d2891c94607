//! The MALMEN editor's decoupled meta-gradient on a tiny model, in f64 (the
//! reference interpreter and the host solve): the (u, delta) cache, the
//! hypernetwork's values, the least-squares shift, the meta-loss of the
//! edited model and its gradient carried back through the solve
//! (`Shift::backward`) and the hypernetwork (`values_vjp`) agree
//!
//! * with central finite differences of the whole pipeline (every
//!   hypernetwork parameter, `lamda` included), and
//! * with the gradient of one fused graph that computes the meta-loss from
//!   the hypernetwork's parameters directly (the inverse of the solve's
//!   matrix as a constant, so every parameter but `lamda`).
//!
//! It also checks that the cache holds what it says: the keys are the
//! layer's inputs and `sum_j delta_j u_j^T` is the layer's weight gradient.

use std::collections::HashMap;

use metac_compiler::models::editor::{Editor, EditorSpec, MetaBatch};
use metac_compiler::models::transformer::{Gpt, GptConfig};
use metac_graphs::autodiff::grad;
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};
use metac_runtime::editor::solve::Shift;
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const T: usize = 4;
const V: usize = 7;

fn editor() -> Editor {
    let gpt = Gpt::new(GptConfig {
        vocab: V,
        context: T,
        width: 4,
        layers: 2,
        heads: 2,
        mlp_ratio: 2,
        tied_head: false,
        moe: None,
        swiglu: None,
    })
    .unwrap();
    // Two MLP projections share a network; the attention projection has
    // its own.
    Editor::new(
        gpt,
        EditorSpec {
            layers: vec![
                "l1.mlp.proj".into(),
                "l0.mlp.proj".into(),
                "l1.attn.proj".into(),
            ],
            rank: 3,
            blocks: 2,
            lr_init: 0.5,
            log_lr: false,
        },
    )
    .unwrap()
}

fn random(shape: &[usize], scale: f64, r: &mut ChaCha8Rng) -> Value {
    let n: usize = shape.iter().product();
    Value::F(
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n).map(|_| r.random_range(-scale..scale)).collect(),
        )
        .unwrap(),
    )
}

fn ints(shape: &[usize], v: Vec<i64>) -> Value {
    Value::from_tensor(&Tensor::i64(shape, v))
}

fn floats(shape: &[usize], v: Vec<f64>) -> Value {
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn run(g: &Graph, f: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, f).unwrap().into_iter().collect()
}

fn flat(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

/// Everything fixed: the LM, the edits, the meta-loss prompts, the
/// normalisers; the hypernetwork varies.
struct Case {
    ed: Editor,
    lm: HashMap<String, Value>,
    cached: HashMap<String, Value>,
    norms: HashMap<String, Value>,
    meta_data: HashMap<String, Value>,
    n: usize,
}

const N: usize = 3; // edits
const CE: usize = 4;
const KL: usize = 3;

fn case() -> Case {
    let ed = editor();
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let lm: HashMap<String, Value> = ed
        .gpt
        .param_shapes()
        .into_iter()
        .map(|(n, s)| (n, random(&s, 0.7, &mut r)))
        .collect();
    let mut feeds = lm.clone();
    feeds.insert(
        "tokens".into(),
        ints(&[N, T], vec![1, 2, 3, 0, 4, 5, 0, 0, 6, 1, 2, 3]),
    );
    feeds.insert("positions".into(), ints(&[N], vec![2, 1, 3]));
    feeds.insert("answers".into(), ints(&[N], vec![4, 6, 2]));
    feeds.insert("weights".into(), floats(&[N], vec![1.0; N]));
    let cached = run(&ed.build_cache(N, T), &feeds);
    let norms = ed
        .norm_shapes()
        .into_iter()
        .map(|(n, s)| {
            let v = if n.ends_with(".std") {
                random(&s, 0.4, &mut r).f().mapv(|x| x.abs() + 0.6)
            } else {
                random(&s, 0.3, &mut r).f().clone()
            };
            (n, Value::F(v))
        })
        .collect();
    let mut meta_data = HashMap::new();
    meta_data.insert(
        "ce.tokens".into(),
        ints(
            &[CE, T],
            vec![1, 2, 3, 0, 4, 5, 0, 0, 6, 1, 2, 3, 3, 3, 1, 0],
        ),
    );
    meta_data.insert("ce.positions".into(), ints(&[CE], vec![2, 1, 3, 2]));
    meta_data.insert("ce.answers".into(), ints(&[CE], vec![4, 6, 2, 5]));
    meta_data.insert(
        "ce.weights".into(),
        floats(&[CE], vec![0.25, 0.25, 0.5, 0.0]),
    );
    meta_data.insert(
        "kl.tokens".into(),
        ints(&[KL, T], vec![2, 2, 0, 0, 5, 4, 3, 0, 1, 6, 6, 2]),
    );
    meta_data.insert("kl.positions".into(), ints(&[KL], vec![1, 2, 3]));
    meta_data.insert("kl.weights".into(), floats(&[KL], vec![0.3, 0.3, 0.3]));
    // The reference distributions: the unedited model's.
    let mut f = lm.clone();
    f.insert("tokens".into(), meta_data["kl.tokens"].clone());
    f.insert("positions".into(), meta_data["kl.positions"].clone());
    let reference = run(&ed.build_logp(KL, T), &f)["logp"].clone();
    meta_data.insert("kl.ref_logp".into(), reference);
    Case {
        ed,
        lm,
        cached,
        norms,
        meta_data,
        n: N,
    }
}

/// Random hypernetwork parameters (B not 0, so that every path counts).
fn hyper(ed: &Editor, seed: u64) -> HashMap<String, Value> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    ed.hyper_shapes()
        .into_iter()
        .map(|(n, s)| (n, random(&s, 0.6, &mut r)))
        .collect()
}

/// The pipeline: values, shifts, meta-loss; with the decoupled gradient
/// when `backward`.
fn pipeline(
    c: &Case,
    h: &HashMap<String, Value>,
    backward: bool,
) -> (f64, HashMap<String, Vec<f64>>) {
    let ed = &c.ed;
    let mut f = c.norms.clone();
    f.extend(
        h.iter()
            .filter(|(k, _)| *k != "hyper.lamda")
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    f.extend(c.cached.clone());
    let values = run(&ed.build_values(c.n), &f);
    let lamda = flat(&h["hyper.lamda"]);
    let mut shifts = vec![];
    let mut edited = c.lm.clone();
    for (li, l) in ed.layers.iter().enumerate() {
        let u = flat(&c.cached[&format!("u.{}", l.name)]);
        let d = flat(&values[&format!("d.{}", l.name)]);
        let s = Shift::solve_f64(&u, &d, c.n, l.d_in, l.d_out, lamda[li], None).unwrap();
        let w = edited.get_mut(&format!("{}.w", l.name)).unwrap();
        let sv = floats(&[l.d_in, l.d_out], s.shift_f64());
        *w = Value::F(w.f() + sv.f());
        shifts.push(s);
    }
    let mut mf = edited;
    mf.extend(c.meta_data.clone());
    let out = run(&ed.build_meta_loss(CE, KL, T), &mf);
    let loss = out["loss"].f().iter().copied().next().unwrap();
    let mut grads = HashMap::new();
    if backward {
        let mut vf = f.clone();
        let mut dlamda = vec![];
        for (l, s) in ed.layers.iter().zip(&shifts) {
            let g = flat(&out[&format!("grad.{}.w", l.name)]);
            let (dd, dl) = s.backward_f64(&g).unwrap();
            vf.insert(format!("dd.{}", l.name), floats(&[c.n, l.d_out], dd));
            dlamda.push(dl);
        }
        for (k, v) in run(&ed.build_values_vjp(c.n), &vf) {
            grads.insert(k.trim_start_matches("grad.").to_string(), flat(&v));
        }
        grads.insert("hyper.lamda".into(), dlamda);
    }
    (loss, grads)
}

#[test]
fn the_cache_holds_keys_and_a_decomposed_gradient() {
    let c = case();
    let ed = &c.ed;
    // The weight gradient of the edits' summed NLL, directly.
    let mut g = Graph::new();
    let params = ed.gpt.params(&mut g);
    let tokens = g.input("tokens", DType::I64, &[N, T]);
    let positions = g.input("positions", DType::I64, &[N]);
    let answers = g.input("answers", DType::I64, &[N]);
    let loss = ed
        .gpt
        .answer_loss(&mut g, &params, tokens, positions, answers);
    let loss = g.mul_scalar(loss, N as f32); // the sum
    let wrt = ed.edited_weights(&params);
    for (l, gr) in ed.layers.iter().zip(grad(&mut g, loss, &wrt)) {
        g.output(&format!("gw.{}", l.name), gr);
    }
    let mut f = c.lm.clone();
    f.insert(
        "tokens".into(),
        ints(&[N, T], vec![1, 2, 3, 0, 4, 5, 0, 0, 6, 1, 2, 3]),
    );
    f.insert("positions".into(), ints(&[N], vec![2, 1, 3]));
    f.insert("answers".into(), ints(&[N], vec![4, 6, 2]));
    let out = run(&g, &f);
    for l in &ed.layers {
        let u = c.cached[&format!("u.{}", l.name)].f();
        let d = c.cached[&format!("delta.{}", l.name)].f();
        assert_eq!(u.shape(), [N, l.d_in]);
        assert_eq!(d.shape(), [N, l.d_out]);
        let gw = out[&format!("gw.{}", l.name)].f();
        // Only the answer positions are cached: the whole weight gradient
        // for the projections of the last block (nothing after them mixes
        // positions), the part at the answer positions for earlier layers
        // (as MALMEN caches, too).
        if l.name.starts_with("l1.") {
            for i in 0..l.d_in {
                for j in 0..l.d_out {
                    let s: f64 = (0..N).map(|k| u[[k, i]] * d[[k, j]]).sum();
                    // (The direct loss is a mean times N: f32 rounding of 1/N.)
                    assert!(
                        (s - gw[[i, j]]).abs() <= 1e-6 * gw[[i, j]].abs().max(1e-6),
                        "{}[{i},{j}]: {s} vs {}",
                        l.name,
                        gw[[i, j]]
                    );
                }
            }
        }
        assert!(d.iter().any(|&x| x != 0.0), "{}", l.name);
    }
}

#[test]
fn the_decoupled_meta_gradient_matches_finite_differences() {
    let c = case();
    let h = hyper(&c.ed, 21);
    let (_, grads) = pipeline(&c, &h, true);
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let dir: HashMap<String, Value> = h
        .iter()
        .map(|(k, v)| (k.clone(), random(v.f().shape(), 1.0, &mut r)))
        .collect();
    let step = |s: f64| -> HashMap<String, Value> {
        h.iter()
            .map(|(k, v)| (k.clone(), Value::F(v.f() + &(dir[k].f() * s))))
            .collect()
    };
    let eps = 1e-5;
    let fd = (pipeline(&c, &step(eps), false).0 - pipeline(&c, &step(-eps), false).0) / (2.0 * eps);
    let an: f64 = grads
        .iter()
        .map(|(k, g)| {
            g.iter()
                .zip(dir[k].f().iter())
                .map(|(a, b)| a * b)
                .sum::<f64>()
        })
        .sum();
    assert!(
        (fd - an).abs() <= 1e-6 * an.abs().max(1e-3),
        "decoupled {an}, finite differences {fd}"
    );
    // Parameter by parameter, so that none is silently dropped.
    for (k, v) in &h {
        let only = |s: f64| {
            let mut x = h.clone();
            x.insert(k.clone(), Value::F(v.f() + &(dir[k].f() * s)));
            x
        };
        let fd =
            (pipeline(&c, &only(eps), false).0 - pipeline(&c, &only(-eps), false).0) / (2.0 * eps);
        let an: f64 = grads[k]
            .iter()
            .zip(dir[k].f().iter())
            .map(|(a, b)| a * b)
            .sum();
        assert!(an != 0.0, "{k}: zero gradient");
        assert!(
            (fd - an).abs() <= 1e-6 * an.abs().max(1e-4),
            "{k}: decoupled {an}, finite differences {fd}"
        );
    }
}

#[test]
fn the_decoupled_meta_gradient_matches_one_fused_graph() {
    let c = case();
    let h = hyper(&c.ed, 22);
    let (loss, grads) = pipeline(&c, &h, true);
    let ed = &c.ed;
    // One graph from the hypernetwork to the meta-loss, the solve as the
    // product with the (constant) inverse of U^T U + lambda I.
    let mut g = Graph::new();
    let hyper_in = ed.hyper_inputs(&mut g);
    let norms = ed.norm_inputs(&mut g);
    let params = ed.gpt.params(&mut g);
    let batch = MetaBatch::inputs(&mut g, CE, KL, T, V);
    let lamda = flat(&h["hyper.lamda"]);
    let mut pairs = vec![];
    let mut keys = vec![];
    for l in &ed.layers {
        let u = c.cached[&format!("u.{}", l.name)].f();
        let d = c.cached[&format!("delta.{}", l.name)].f();
        let f32s = |a: &ArrayD<f64>| Tensor::f32(a.shape(), a.iter().map(|&x| x as f32).collect());
        let (uc, dc) = (g.constant(f32s(u)), g.constant(f32s(d)));
        pairs.push((uc, dc));
        keys.push(uc);
    }
    let values = ed.values_of(&mut g, &hyper_in, &norms, &pairs);
    let mut edited: Vec<NodeId> = params.clone();
    let names = ed.gpt.param_shapes();
    for (li, (l, &d)) in ed.layers.iter().zip(&values).enumerate() {
        let u = flat(&c.cached[&format!("u.{}", l.name)]);
        // (U^T U + lambda I)^{-1}, from the host solve's factorisation.
        let s = Shift::solve_f64(&u, &vec![0.0; c.n], c.n, l.d_in, 1, lamda[li], None).unwrap();
        let eye: Vec<f64> = (0..l.d_in * l.d_in)
            .map(|k| if k % (l.d_in + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let inv = s.apply_inverse(&eye, l.d_in).unwrap();
        let ainv = g.constant(Tensor::f32(
            &[l.d_in, l.d_in],
            inv.iter().map(|&x| x as f32).collect(),
        ));
        let ut = g.transpose(keys[li], &[1, 0]);
        let utd = g.matmul(ut, d);
        let shift = g.matmul(ainv, utd);
        let w = format!("{}.w", l.name);
        let k = names.iter().position(|(n, _)| *n == w).unwrap();
        edited[k] = g.add(params[k], shift);
    }
    let meta = ed.meta_loss_of(&mut g, &edited, &batch);
    g.output("loss", meta);
    let ids: Vec<NodeId> = hyper_in.iter().map(|(_, id)| *id).collect();
    for ((n, _), gr) in hyper_in.iter().zip(grad(&mut g, meta, &ids)) {
        g.output(&format!("grad.{n}"), gr);
    }
    let mut f = c.norms.clone();
    f.extend(
        h.iter()
            .filter(|(k, _)| *k != "hyper.lamda")
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    f.extend(c.lm.clone());
    f.extend(c.meta_data.clone());
    let out = run(&g, &f);
    // The constants are f32 (the interpreter's constants are tensors), so
    // agreement is to f32 rounding.
    let fused_loss = out["loss"].f().iter().copied().next().unwrap();
    assert!(
        (fused_loss - loss).abs() <= 1e-5 * loss.abs(),
        "{fused_loss} vs {loss}"
    );
    for (n, _) in &hyper_in {
        let fused = flat(&out[&format!("grad.{n}")]);
        let dec = &grads[n];
        let err = fused
            .iter()
            .zip(dec)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = dec.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-6);
        assert!(err <= 1e-4 * scale, "{n}: error {err}, scale {scale}");
    }
}

/// The editor's graphs exported to ONNX and run in f32 by ONNX Runtime
/// (fused and op by op) agree with the reference interpreter.
#[test]
fn the_editor_graphs_agree_on_onnx_runtime() {
    use metac_compiler::metatest::to_onnx;
    use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
    use metac_runtime::tensor::HostTensor;

    let c = case();
    let ed = &c.ed;
    let h = hyper(ed, 23);
    let mut feeds: HashMap<String, Value> = c.lm.clone();
    feeds.extend(c.norms.clone());
    feeds.extend(h.clone());
    feeds.extend(c.cached.clone());
    feeds.extend(c.meta_data.clone());
    feeds.insert(
        "tokens".into(),
        ints(&[N, T], vec![1, 2, 3, 0, 4, 5, 0, 0, 6, 1, 2, 3]),
    );
    feeds.insert("positions".into(), ints(&[N], vec![2, 1, 3]));
    feeds.insert("answers".into(), ints(&[N], vec![4, 6, 2]));
    feeds.insert("weights".into(), floats(&[N], vec![1.0, 1.0, 0.0]));
    let mut r = ChaCha8Rng::seed_from_u64(3);
    for l in &ed.layers {
        feeds.insert(format!("dd.{}", l.name), random(&[N, l.d_out], 1.0, &mut r));
    }
    let graphs = [
        ("cache", ed.build_cache(N, T)),
        ("values", ed.build_values(N)),
        ("values_vjp", ed.build_values_vjp(N)),
        ("meta_loss", ed.build_meta_loss(CE, KL, T)),
        ("logp", ed.build_logp(KL, T)),
    ];
    for unfused in [false, true] {
        let backend = open_backend(&BackendOptions {
            choice: BackendChoice::Ort,
            unfused,
            ..Default::default()
        })
        .expect("ONNX Runtime (pip install -r requirements.txt)");
        for (name, g) in &graphs {
            let want = run(g, &feeds);
            let mut s = backend.load(&to_onnx(g, name).unwrap(), name).unwrap();
            let inputs: Vec<(String, HostTensor)> = g
                .inputs()
                .iter()
                .map(|(n, _)| (n.clone(), HostTensor::from_graph(&feeds[n].to_tensor())))
                .collect();
            let refs: Vec<(&str, &HostTensor)> =
                inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (n, got) in s.run(&refs).unwrap() {
                let got: Vec<f64> = got
                    .as_f32()
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let w = flat(&want[&n]);
                let err = got
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let scale = w.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-6);
                assert!(
                    err <= 1e-4 * scale,
                    "{name}.{n} (unfused {unfused}): error {err}, scale {scale}"
                );
            }
        }
    }
}
