//! `metac hessian` as a user runs it: on parameters written like `metac
//! eval` writes them (a data-free quadratic, whose Hessian `W^T W` is known,
//! and the MNIST MLP on a few examples), on an eval directory, and bad
//! inputs as one-line errors with exit status 2.

mod common;

use std::path::Path;

use common::{err_line, metac, ok};
use metac_compiler::models::problems::problem_by_name;
use metac_compiler::models::synthetic::{Synthetic, DATA_SEED};
use metac_runtime::hessian::symmetric_eigenvalues;
use metac_runtime::metatest::{params_path, write_params};
use metac_runtime::tensor::HostTensor;
use serde_json::Value;

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("hessian-cli", name)
}

/// Writes the initial parameters of `problem` for `seed` as `metac eval` would.
fn write_init(dir: &Path, problem: &str, label: &str, seed: u64) -> std::path::PathBuf {
    let p = problem_by_name(problem, 1).unwrap();
    let names: Vec<String> = p.param_shapes().into_iter().map(|(n, _)| n).collect();
    let vals: Vec<_> = p
        .init_params(seed)
        .iter()
        .map(HostTensor::from_graph)
        .collect();
    let path = params_path(dir, label, seed);
    write_params(&path, &names, &vals).unwrap();
    path
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quadratic_matches_its_exact_spectrum() {
    let d = scratch("quadratic");
    let params = write_init(&d, "quadratic", "adam-1e-3", 6);
    let out = d.join("out");
    let o = metac(&[
        "hessian",
        "--problem",
        "quadratic",
        "--params",
        s(&params),
        "--out",
        s(&out),
        "--probes",
        "50",
        "--top",
        "3",
        "--slq-runs",
        "3",
        "--backend",
        "tract",
    ]);
    ok(&o);
    let Synthetic::Quadratic { w, .. } = Synthetic::quadratic(20, DATA_SEED) else {
        unreachable!()
    };
    let wv = w.as_f32().unwrap();
    let n = 20;
    let mut wtw = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            wtw[i * n + j] = (0..n)
                .map(|k| wv[k * n + i] as f64 * wv[k * n + j] as f64)
                .sum();
        }
    }
    let exact = symmetric_eigenvalues(&wtw, n);
    let trace: f64 = exact.iter().sum();
    let r = json(&out.join("hessian.json"));
    assert_eq!(r["problem"], "quadratic");
    assert_eq!(r["num_params"], 20);
    assert!(r["data"].is_null());
    assert_eq!(r["settings"]["probes"], 50);
    assert_eq!(r["lanczos_steps_taken"], 20);
    let mean = r["trace"]["mean"].as_f64().unwrap();
    let se = r["trace"]["stderr"].as_f64().unwrap();
    assert!((mean - trace).abs() < 4.0 * se, "{mean} vs {trace} ({se})");
    let top = r["top_eigenvalues"]["values"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    for (i, v) in top.iter().enumerate() {
        let want = exact[n - 1 - i];
        assert!((v.as_f64().unwrap() - want).abs() < 1e-4 * want);
    }
    let slq = r["slq"].as_array().unwrap();
    assert_eq!(slq.len(), 3);
    for run in slq {
        let w: f64 = run["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((w - 1.0).abs() < 1e-6);
    }
    let grid = r["density"]["grid"].as_array().unwrap();
    assert_eq!(grid.len(), 1000);
    common::assert_png(&out.join("density.png"));
}

#[test]
fn mnist_eval_directory_is_compared() {
    let d = scratch("eval");
    let eval = d.join("eval");
    std::fs::create_dir_all(&eval).unwrap();
    std::fs::write(
        eval.join("summary.json"),
        r#"{"problem": "mnist-mlp", "split": "test", "optimizers": []}"#,
    )
    .unwrap();
    write_init(&eval, "mnist-mlp", "adam-1e-3", 1);
    write_init(&eval, "mnist-mlp", "learned", 1);
    let out = d.join("out");
    let o = metac(&[
        "hessian",
        "--eval",
        s(&eval),
        "--out",
        s(&out),
        "--examples",
        "30",
        "--batch-size",
        "20",
        "--probes",
        "3",
        "--lanczos-steps",
        "6",
        "--slq-runs",
        "2",
        "--top",
        "2",
        "--backend",
        "tract",
    ]);
    ok(&o);
    let sum = json(&out.join("summary.json"));
    assert_eq!(sum["problem"], "mnist-mlp");
    assert_eq!(sum["data"]["examples"], 30);
    assert_eq!(sum["data"]["chunks"], 2);
    let files = sum["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["file"], "adam-1e-3-seed1");
    // The same parameters, data and probes give the same numbers.
    assert_eq!(files[0]["trace_mean"], files[1]["trace_mean"]);
    assert!(files[0]["top_eigenvalue"].as_f64().unwrap() > 0.0);
    for f in ["adam-1e-3-seed1", "learned-seed1"] {
        let r = json(&out.join(f).join("hessian.json"));
        assert_eq!(r["num_params"], 15910);
        assert_eq!(r["data"]["split"], "test");
        assert!(out.join(f).join("density.png").exists());
    }
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let d = scratch("bad");
    // A parameter file of another problem: wrong tensor name.
    let rosen = write_init(&d, "rosenbrock", "x", 1);
    let e = err_line(&metac(&[
        "hessian",
        "--problem",
        "softmax-regression-random",
        "--params",
        s(&rosen),
        "--out",
        s(&d),
    ]));
    assert!(e.contains(s(&rosen)) && e.contains("'w'"), "{e}");
    // Right name, wrong shape.
    let e = err_line(&metac(&[
        "hessian",
        "--problem",
        "styblinski-tang",
        "--params",
        s(&rosen),
        "--out",
        s(&d),
    ]));
    assert!(
        e.contains(s(&rosen)) && e.contains("'x'") && e.contains("[2]"),
        "{e}"
    );
    let e = err_line(&metac(&["hessian", "--problem", "nope", "--out", s(&d)]));
    assert!(
        e.contains("known problems") && e.contains("mnist-mlp"),
        "{e}"
    );
    let e = err_line(&metac(&[
        "hessian",
        "--problem",
        "quadratic",
        "--split",
        "test",
        "--out",
        s(&d),
    ]));
    assert!(e.contains("data-free"), "{e}");
    let e = err_line(&metac(&["hessian", "--out", s(&d)]));
    assert!(e.contains("--problem"), "{e}");
    let e = err_line(&metac(&[
        "hessian",
        "--eval",
        s(&d.join("none")),
        "--out",
        s(&d),
    ]));
    assert!(e.contains("summary.json"), "{e}");
}

/// `--model`: the ONNX fixture MLP (784-20-10 sigmoid, cross-entropy, batch
/// 8, PyTorch layout) at the parameters of the built-in `mnist-mlp` (weights
/// transposed) has the same loss, gradient norm and top eigenvalues as the
/// built-in problem on the same examples: two independent routes to one
/// Hessian (importer and builder).
#[test]
fn onnx_model_agrees_with_the_builtin_problem() {
    let d = scratch("onnx-model");
    let builtin = write_init(&d, "mnist-mlp", "builtin", 2);
    let p = problem_by_name("mnist-mlp", 1).unwrap();
    let vals: Vec<_> = p
        .init_params(2)
        .iter()
        .map(HostTensor::from_graph)
        .collect();
    let t = |v: &metac_runtime::tensor::HostTensor| {
        let a = v.as_f32().unwrap();
        let a2 = a.clone().into_dimensionality::<ndarray::Ix2>().unwrap();
        metac_runtime::tensor::HostTensor::F32(a2.t().as_standard_layout().into_owned().into_dyn())
    };
    let model_params = d.join("model.safetensors");
    let names: Vec<String> = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    write_params(
        &model_params,
        &names,
        &[t(&vals[0]), vals[1].clone(), t(&vals[2]), vals[3].clone()],
    )
    .unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/onnx/mlp_ce_opset18.onnx");
    let common_flags = [
        "--examples",
        "24",
        "--batch-size",
        "8",
        "--probes",
        "4",
        "--lanczos-steps",
        "40",
        "--slq-runs",
        "1",
        "--top",
        "2",
        "--backend",
        "tract",
    ];
    let run = |what: &[&str], out: &Path| {
        let mut args = vec!["hessian"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["--out", s(out)]);
        args.extend_from_slice(&common_flags);
        ok(&metac(&args));
        json(&out.join("hessian.json"))
    };
    let a = run(
        &["--problem", "mnist-mlp", "--params", s(&builtin)],
        &d.join("builtin"),
    );
    let b = run(
        &[
            "--model",
            s(&fixture),
            "--loss",
            "loss",
            "--params",
            s(&model_params),
        ],
        &d.join("model"),
    );
    assert_eq!(b["num_params"], 15910);
    assert_eq!(b["data"]["examples"], 24);
    let close = |key: &str, x: &Value, y: &Value, tol: f64| {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!(
            (x - y).abs() <= tol * x.abs().max(y.abs()),
            "{key}: built-in {x} vs ONNX model {y}"
        );
    };
    close("loss", &a["loss"], &b["loss"], 1e-5);
    close("grad_norm", &a["grad_norm"], &b["grad_norm"], 1e-4);
    for i in 0..2 {
        close(
            "top eigenvalue",
            &a["top_eigenvalues"]["values"][i],
            &b["top_eigenvalues"]["values"][i],
            1e-3,
        );
    }
}
