//! The optimizee problem set: every problem's loss graph evaluates at its
//! init, its gradient matches central finite differences in f64, its init is
//! deterministic, and the known minima are minima. Small batches only: the
//! f64 interpreter is the reference, not a fast backend.

use std::collections::HashMap;
use std::path::PathBuf;

use metac_compiler::models::problems::{
    accuracy, inline_graph, problem_by_name, problem_names, try_inline_graph, DataKind,
    OnnxProblem, Problem, SeededRng,
};
use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse};
use metac_graphs::eval::{eval_graph, eval_nodes, Value};
use metac_graphs::{DType, Graph, NodeId, Tensor};

const BATCH: usize = 2;

/// A random batch for the problem's batch inputs: floats uniform in [0,1]
/// (rounded to f32, like MNIST pixels), i64 labels in 0..10.
fn random_batch(p: &dyn Problem, seed: u64) -> Vec<Value> {
    let mut rng = SeededRng::new(seed, 99);
    p.batch_inputs()
        .iter()
        .map(|(_, d, s)| {
            let n: usize = s.iter().product();
            match d {
                DType::F32 => Value::from_tensor(&Tensor::f32(
                    s,
                    (0..n).map(|_| rng.uniform() as f32).collect(),
                )),
                DType::I64 => Value::from_tensor(&Tensor::i64(
                    s,
                    (0..n).map(|_| rng.below(10) as i64).collect(),
                )),
                DType::Bool => panic!("no bool batch inputs expected"),
            }
        })
        .collect()
}

/// A graph with outputs `loss`, `grad_<i>` per parameter, and the nodes.
struct GradGraph {
    g: Graph,
    loss: NodeId,
}

fn grad_graph(p: &dyn Problem) -> GradGraph {
    let mut g = Graph::new();
    let (params, batch) = p.declare_inputs(&mut g);
    let loss = p.loss(&mut g, &params, &batch);
    assert!(
        g.shape(loss).is_empty(),
        "{}: loss is not a scalar",
        p.name()
    );
    assert_eq!(g.dtype(loss), DType::F32);
    let grads = grad(&mut g, loss, &params);
    g.output("loss", loss);
    for (i, gr) in grads.iter().enumerate() {
        g.output(&format!("grad_{i}"), *gr);
    }
    GradGraph { g, loss }
}

fn feeds(p: &dyn Problem, params: &[Value], batch: &[Value]) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for ((n, _), v) in p.param_shapes().iter().zip(params) {
        m.insert(n.clone(), v.clone());
    }
    for ((n, _, _), v) in p.batch_inputs().iter().zip(batch) {
        m.insert(n.clone(), v.clone());
    }
    m
}

fn scalar(v: &Value) -> f64 {
    assert!(v.shape().is_empty());
    v.f().iter().copied().next().unwrap()
}

/// Loss and gradients (flattened) at `params`.
fn loss_and_grads(
    gg: &GradGraph,
    p: &dyn Problem,
    params: &[Value],
    batch: &[Value],
) -> (f64, Vec<Vec<f64>>) {
    let out = eval_graph(&gg.g, &feeds(p, params, batch)).unwrap();
    let loss = scalar(&out[0].1);
    let grads = out[1..]
        .iter()
        .map(|(_, v)| v.f().iter().copied().collect())
        .collect();
    (loss, grads)
}

fn loss_only(gg: &GradGraph, p: &dyn Problem, params: &[Value], batch: &[Value]) -> f64 {
    let vals = eval_nodes(&gg.g, &feeds(p, params, batch), &[gg.loss]).unwrap();
    scalar(vals[gg.loss.index()].as_ref().unwrap())
}

fn perturb(v: &Value, k: usize, d: f64) -> Value {
    let mut v = v.clone();
    match &mut v {
        Value::F(a) => *a.iter_mut().nth(k).unwrap() += d,
        _ => panic!("parameters are f32"),
    }
    v
}

fn problems() -> Vec<Box<dyn Problem>> {
    problem_names()
        .iter()
        .map(|n| problem_by_name(n, BATCH).unwrap())
        .collect()
}

fn is_classifier10(name: &str) -> bool {
    name.starts_with("mnist-") || name == "softmax-regression-random"
}

/// Central differences on a few random elements of every parameter; returns
/// the worst relative error.
fn check_gradient(
    p: &dyn Problem,
    params: &[Value],
    batch: &[Value],
    per_param: usize,
    seed: u64,
) -> f64 {
    let gg = grad_graph(p);
    let (_, grads) = loss_and_grads(&gg, p, params, batch);
    let mut rng = SeededRng::new(seed, 7);
    let mut worst = 0.0f64;
    for (i, v) in params.iter().enumerate() {
        let n = v.f().len();
        for _ in 0..per_param.min(n) {
            let k = rng.below(n as u64) as usize;
            let x = v.f().iter().nth(k).copied().unwrap();
            let an = grads[i][k];
            // A ReLU kink within the step spoils one step size but not all:
            // take the best of three (a wrong gradient matches at none).
            let (mut rel, mut fd) = (f64::INFINITY, f64::NAN);
            for step in [1e-5, 1e-6, 1e-7] {
                let h = step * x.abs().max(1.0);
                let mut up = params.to_vec();
                up[i] = perturb(v, k, h);
                let mut dn = params.to_vec();
                dn[i] = perturb(v, k, -h);
                let d = (loss_only(&gg, p, &up, batch) - loss_only(&gg, p, &dn, batch)) / (2.0 * h);
                let r = (d - an).abs() / d.abs().max(an.abs()).max(1e-4);
                if r < rel {
                    (rel, fd) = (r, d);
                }
                if rel < 1e-7 {
                    break;
                }
            }
            assert!(
                rel < 1e-5,
                "{}: d loss / d {}[{k}]: autodiff {an:e}, finite differences {fd:e} (rel {rel:e})",
                p.name(),
                p.param_shapes()[i].0
            );
            worst = worst.max(rel);
        }
    }
    worst
}

fn values(ts: &[Tensor]) -> Vec<Value> {
    ts.iter().map(Value::from_tensor).collect()
}

#[test]
fn registry_names_and_errors() {
    let names = problem_names();
    assert!(names.len() >= 12);
    for n in names {
        let p = problem_by_name(n, 4).unwrap();
        assert_eq!(p.name(), *n);
    }
    let e = problem_by_name("nope", 4).err().unwrap();
    for n in names {
        assert!(e.contains(n), "error '{e}' does not list '{n}'");
    }
    assert!(problem_by_name("mnist-mlp", 0).is_err());
}

#[test]
fn param_counts_and_data_kinds() {
    let want = [
        ("mnist-mlp", 15_910),
        ("mnist-mlp-relu", 15_910),
        ("mnist-mlp-deep", 16_330),
        ("mnist-convnet", 9_098),
        ("quadratic", 20),
        ("rosenbrock", 2),
        ("beale", 2),
        ("booth", 2),
        ("matyas", 2),
        ("styblinski-tang", 10),
        ("softmax-regression-random", 210),
        ("logsumexp", 10),
    ];
    for (n, count) in want {
        let p = problem_by_name(n, 128).unwrap();
        assert_eq!(p.num_params(), count, "{n}");
        if n.starts_with("mnist-") {
            assert_eq!(p.needs_data(), Some(DataKind::Mnist));
            let b = p.batch_inputs();
            assert_eq!(b[0], ("x".to_string(), DType::F32, vec![128, 784]));
            assert_eq!(b[1], ("y".to_string(), DType::I64, vec![128]));
        } else {
            assert_eq!(p.needs_data(), None);
            assert!(p.batch_inputs().is_empty());
        }
    }
}

#[test]
fn init_is_deterministic_and_shaped() {
    for p in problems() {
        let a = p.init_params(6);
        let b = p.init_params(6);
        let c = p.init_params(12);
        assert_eq!(a, b, "{}: init is not deterministic", p.name());
        assert_ne!(a, c, "{}: init ignores the seed", p.name());
        let shapes = p.param_shapes();
        assert_eq!(a.len(), shapes.len());
        for (t, (n, s)) in a.iter().zip(&shapes) {
            assert_eq!(&t.shape, s, "{}: {n}", p.name());
            assert_eq!(t.dtype(), DType::F32);
            assert!(t.as_f32().unwrap().iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn mnist_init_scheme_is_fan_in_normal() {
    // N(0,1) * 1.2/sqrt(fan_in) weights, zero biases.
    let p = problem_by_name("mnist-mlp", 4).unwrap();
    let init = p.init_params(0);
    for (t, (n, s)) in init.iter().zip(p.param_shapes()) {
        let v = t.as_f32().unwrap();
        if s.len() == 1 {
            assert!(v.iter().all(|&x| x == 0.0), "{n}");
            continue;
        }
        let want = 1.2 / (s[0] as f64).sqrt();
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((sd / want - 1.0).abs() < 0.2, "{n}: std {sd} want {want}");
        assert!(
            m.abs() < 4.0 * want / (v.len() as f64).sqrt(),
            "{n}: mean {m}"
        );
    }
    // Stream per parameter: changing one problem's depth keeps w0 the same.
    let deep = problem_by_name("mnist-mlp-deep", 4).unwrap().init_params(0);
    assert_eq!(deep[0], init[0]);
}

#[test]
fn loss_at_init_is_finite_and_classifiers_start_near_ln10() {
    // A larger batch here (forward only) keeps the ln 10 check robust.
    for n in problem_names() {
        let p = problem_by_name(n, 16).unwrap();
        let g = p.loss_graph();
        let batch = random_batch(p.as_ref(), 1);
        let params = values(&p.init_params(6));
        let out = eval_graph(&g, &feeds(p.as_ref(), &params, &batch)).unwrap();
        let loss = scalar(&out[0].1);
        assert!(loss.is_finite(), "{}: loss {loss}", p.name());
        if is_classifier10(p.name()) {
            assert!(
                (loss - 10f64.ln()).abs() < 0.6,
                "{}: initial loss {loss}, want about ln 10",
                p.name()
            );
            let acc = scalar(&out[1].1);
            assert_eq!(out[1].0, "accuracy");
            assert!((0.0..=1.0).contains(&acc), "{}: accuracy {acc}", p.name());
        } else {
            assert_eq!(
                out.len(),
                1,
                "{}: only classifiers have an accuracy output",
                p.name()
            );
        }
        eprintln!("{}: loss at init {loss:.6}", p.name());
    }
}

#[test]
fn gradients_match_finite_differences() {
    for p in problems() {
        let batch = random_batch(p.as_ref(), 2);
        let params = values(&p.init_params(6));
        let worst = check_gradient(p.as_ref(), &params, &batch, 4, 3);
        eprintln!("{}: worst rel err {worst:.2e}", p.name());
    }
}

/// Second order, as meta-training through optimizer steps needs it: both
/// HVP modes match central differences of the gradient along a random
/// direction.
#[test]
fn hvps_match_finite_differences_of_the_gradient() {
    for p in problems() {
        let p = p.as_ref();
        let mut g = Graph::new();
        let (params, batch_ids) = p.declare_inputs(&mut g);
        let shapes = p.param_shapes();
        let vs: Vec<NodeId> = shapes
            .iter()
            .map(|(n, s)| g.input(&format!("v/{n}"), DType::F32, s))
            .collect();
        let loss = p.loss(&mut g, &params, &batch_ids);
        let grads = grad(&mut g, loss, &params);
        let fr = hvp_forward_over_reverse(&mut g, loss, &params, &vs);
        let rr = hvp_reverse_over_reverse(&mut g, loss, &params, &vs);
        let k = params.len();
        for (i, id) in grads.iter().chain(&fr).chain(&rr).enumerate() {
            g.output(&format!("o{i}"), *id);
        }
        let batch = random_batch(p, 4);
        let x = values(&p.init_params(6));
        let mut rng = SeededRng::new(11, 0);
        let v: Vec<Value> = shapes
            .iter()
            .map(|(_, s)| {
                let n: usize = s.iter().product();
                Value::from_tensor(&Tensor::f32(
                    s,
                    (0..n).map(|_| rng.normal() as f32).collect(),
                ))
            })
            .collect();
        let run = |x: &[Value]| {
            let mut f = feeds(p, x, &batch);
            for ((n, _), vv) in shapes.iter().zip(&v) {
                f.insert(format!("v/{n}"), vv.clone());
            }
            let out = eval_graph(&g, &f).unwrap();
            out.iter()
                .map(|(_, o)| o.f().iter().copied().collect::<Vec<f64>>())
                .collect::<Vec<_>>()
        };
        let at = run(&x);
        let flat = |xs: &[Vec<f64>]| xs.iter().flatten().copied().collect::<Vec<f64>>();
        let (hfr, hrr) = (flat(&at[k..2 * k]), flat(&at[2 * k..]));
        let norm = |a: &[f64]| a.iter().map(|t| t * t).sum::<f64>().sqrt();
        let diff =
            |a: &[f64], b: &[f64]| norm(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>());
        let scale = norm(&hfr).max(1e-6);
        assert!(
            diff(&hfr, &hrr) / scale < 1e-9,
            "{}: fwd-rev and rev-rev HVPs differ",
            p.name()
        );
        let mut best = f64::INFINITY;
        for h in [1e-5, 1e-6] {
            let shift = |sign: f64| -> Vec<Value> {
                x.iter()
                    .zip(&v)
                    .map(|(xv, vv)| match (xv, vv) {
                        (Value::F(a), Value::F(b)) => Value::F(a + &(b * (sign * h))),
                        _ => unreachable!(),
                    })
                    .collect()
            };
            let (gp, gm) = (run(&shift(1.0)), run(&shift(-1.0)));
            let fd: Vec<f64> = flat(&gp[..k])
                .iter()
                .zip(flat(&gm[..k]))
                .map(|(a, b)| (a - b) / (2.0 * h))
                .collect();
            best = best.min(diff(&hfr, &fd) / scale);
            if best < 1e-7 {
                break;
            }
        }
        eprintln!(
            "{}: |Hv| {scale:.3e}, rel err vs finite differences {best:.2e}",
            p.name()
        );
        assert!(best < 1e-5, "{}: HVP rel err {best:e}", p.name());
    }
}

#[test]
fn known_minima_have_zero_loss_and_gradient() {
    let mut seen = vec![];
    for p in problems() {
        let Some((x, fmin)) = p.known_minimum() else {
            continue;
        };
        seen.push(p.name().to_string());
        let gg = grad_graph(p.as_ref());
        let (loss, grads) = loss_and_grads(&gg, p.as_ref(), &values(&x), &[]);
        assert!(
            (loss - fmin).abs() < 1e-12,
            "{}: loss at the minimum {loss}",
            p.name()
        );
        for gr in grads.iter().flatten() {
            assert!(
                gr.abs() < 1e-12,
                "{}: gradient at the minimum {grads:?}",
                p.name()
            );
        }
        // And the init is not already there.
        let (l0, _) = loss_and_grads(&gg, p.as_ref(), &values(&p.init_params(0)), &[]);
        assert!(l0 > fmin + 1e-3, "{}: loss at init {l0}", p.name());
    }
    for n in ["rosenbrock", "booth", "matyas", "beale"] {
        assert!(seen.iter().any(|s| s == n), "{n} has no known minimum");
    }
}

#[test]
fn styblinski_tang_minimum_value() {
    let p = problem_by_name("styblinski-tang", 1).unwrap();
    let x = Tensor::f32(&[10], vec![-2.903_534; 10]);
    let gg = grad_graph(p.as_ref());
    let (loss, grads) = loss_and_grads(&gg, p.as_ref(), &values(&[x]), &[]);
    assert!((loss - -39.166_165_7 * 10.0).abs() < 1e-4, "{loss}");
    assert!(grads[0].iter().all(|g| g.abs() < 1e-4));
}

#[test]
fn accuracy_compares_with_row_max() {
    let mut g = Graph::new();
    let logits = g.constant(Tensor::f32(
        &[4, 3],
        vec![1., 2., 0., 5., 1., 1., 0., 0., 3., 2., 2., 1.],
    ));
    let labels = g.const_i64(&[4], vec![1, 1, 2, 0]);
    let acc = accuracy(&mut g, logits, labels);
    g.output("acc", acc);
    let out = eval_graph(&g, &HashMap::new()).unwrap();
    // rows: hit, miss, hit, tie counts as hit
    assert!((scalar(&out[0].1) - 0.75).abs() < 1e-12);
}

#[test]
fn inline_graph_binds_inputs_and_checks_types() {
    let mut src = Graph::new();
    let a = src.input("a", DType::F32, &[2]);
    let b = src.input("b", DType::F32, &[2]);
    let _unused = src.input("unused", DType::F32, &[7]);
    let s = src.mul(a, b);
    let t = src.sum_all(s);
    src.output("dot", t);
    src.output("prod", s);

    let mut dst = Graph::new();
    let x = dst.input("p/x", DType::F32, &[2]);
    let y = dst.constant(Tensor::f32(&[2], vec![3.0, 4.0]));
    let bind: HashMap<String, NodeId> = [("a".to_string(), x), ("b".to_string(), y)].into();
    let outs = inline_graph(&mut dst, &src, &bind);
    dst.output("dot", outs["dot"]);
    let feeds: HashMap<String, Value> = [(
        "p/x".to_string(),
        Value::from_tensor(&Tensor::f32(&[2], vec![1.0, 2.0])),
    )]
    .into();
    let out = eval_graph(&dst, &feeds).unwrap();
    assert_eq!(scalar(&out[0].1), 11.0);
    assert_eq!(dst.shape(outs["prod"]), &[2]);

    let mut dst = Graph::new();
    let x = dst.input("x", DType::F32, &[3]);
    let bind: HashMap<String, NodeId> = [("a".to_string(), x), ("b".to_string(), x)].into();
    let e = try_inline_graph(&mut dst, &src, &bind).unwrap_err();
    assert!(e.contains("'a'"), "{e}");
    let e = try_inline_graph(&mut dst, &src, &HashMap::new()).unwrap_err();
    assert!(e.contains("not bound"), "{e}");
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/onnx")
        .join(name)
}

fn json_f32(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn onnx_problem_matches_pytorch_reference() {
    let path = fixture("mlp_ce_opset18.onnx");
    let p = OnnxProblem::from_file(&path, "loss")
        .unwrap()
        .with_data(Some(DataKind::Mnist));
    assert_eq!(p.name(), "mlp_ce_opset18");
    assert_eq!(p.needs_data(), Some(DataKind::Mnist));
    let shapes = p.param_shapes();
    let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]);
    assert_eq!(p.num_params(), 15_910);
    assert_eq!(
        p.batch_inputs(),
        vec![
            ("x".to_string(), DType::F32, vec![8, 784]),
            ("y".to_string(), DType::I64, vec![8])
        ]
    );
    assert_eq!(
        p.init_params(1),
        p.init_params(2),
        "file values, whatever the seed"
    );

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mlp_ce_opset18.ref.json")).unwrap())
            .unwrap();
    let x = Tensor::f32(&[8, 784], json_f32(&r["inputs"]["x"]["data"]));
    let y = Tensor::i64(
        &[8],
        r["inputs"]["y"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect(),
    );
    let batch = values(&[x, y]);
    let params = values(&p.init_params(0));
    for ((n, _), t) in shapes.iter().zip(p.init_params(0)) {
        assert_eq!(
            t.as_f32().unwrap(),
            json_f32(&r["params"][n]["data"]).as_slice(),
            "{n}"
        );
    }
    let gg = grad_graph(&p);
    let (loss, grads) = loss_and_grads(&gg, &p, &params, &batch);
    let want = r["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-7 * want, "loss {loss} want {want}");
    for ((n, _), gr) in shapes.iter().zip(&grads) {
        let want: Vec<f64> = r["grad"][n]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = gr
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-6 * scale + 1e-12,
            "grad {n}: max err {err:e} (scale {scale:e})"
        );
    }
    check_gradient(&p, &params, &batch, 4, 5);

    // Problems inline into graphs whose inputs have other names.
    let mut g = Graph::new();
    let prm: Vec<NodeId> = shapes
        .iter()
        .map(|(n, s)| g.input(&format!("opt/{n}"), DType::F32, s))
        .collect();
    let bx = g.input("batch/x", DType::F32, &[8, 784]);
    let by = g.input("batch/y", DType::I64, &[8]);
    let l = p.loss(&mut g, &prm, &[bx, by]);
    let l2 = p.loss(&mut g, &prm, &[bx, by]);
    g.output("l", l);
    g.output("l2", l2);
    let mut f = HashMap::new();
    for ((n, _), v) in shapes.iter().zip(&params) {
        f.insert(format!("opt/{n}"), v.clone());
    }
    f.insert("batch/x".into(), batch[0].clone());
    f.insert("batch/y".into(), batch[1].clone());
    let out = eval_graph(&g, &f).unwrap();
    assert_eq!(scalar(&out[0].1), loss);
    assert_eq!(scalar(&out[1].1), loss);
}

#[test]
fn onnx_problem_rejects_bad_loss_outputs() {
    let m = metac_graphs::onnx::import_file(&fixture("mlp_ce_opset18.onnx")).unwrap();
    let e = OnnxProblem::new("m", m, "nope").unwrap_err();
    assert!(e.contains("outputs: loss"), "{e}");
    let m = metac_graphs::onnx::import_file(&fixture("mlp_logits_opset18.onnx")).unwrap();
    let out = m.graph.outputs()[0].0.clone();
    let e = OnnxProblem::new("m", m, &out).unwrap_err();
    assert!(e.contains("scalar"), "{e}");
}

#[test]
fn loss_and_gradient_graphs_export_to_onnx() {
    for p in problems() {
        let mut g = Graph::new();
        let (params, batch) = p.declare_inputs(&mut g);
        let loss = p.loss(&mut g, &params, &batch);
        let grads = grad(&mut g, loss, &params);
        g.output("loss", loss);
        for ((n, _), gr) in p.param_shapes().iter().zip(grads) {
            g.output(&format!("grad_{n}"), gr);
        }
        if let Some(acc) = p.accuracy(&mut g, &params, &batch) {
            g.output("accuracy", acc);
        }
        let g = metac_graphs::passes::optimize(&g);
        let bytes = metac_graphs::onnx::export_bytes(&g, p.name())
            .unwrap_or_else(|e| panic!("{}: {e}", p.name()));
        assert!(!bytes.is_empty());
    }
}
