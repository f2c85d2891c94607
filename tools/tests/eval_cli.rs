//! `metac eval` as a user runs it: a tiny bundle meta-trained for one
//! iteration, then its learned optimizer and two baselines on MNIST test
//! batches; the curves, summary and plot are written, and bad names are
//! one-line errors with exit status 2.

mod common;

use std::path::Path;

use common::{err_line, metac, ok, root};

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("eval-cli", name)
}

/// A tiny bundle and a one-iteration run of it.
fn bundle_and_run(d: &Path) -> (String, String) {
    let bundle = d.join("bundle");
    let run = d.join("run");
    let cfg = root().join("configs/tiny.toml");
    ok(&metac(&[
        "compile",
        "l2o",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]));
    ok(&metac(&[
        "run",
        bundle.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--meta-iterations",
        "1",
        "--unroll-length",
        "2",
        "--num-unrolls",
        "1",
        "--quiet",
        "--backend",
        "tract",
    ]));
    (
        bundle.to_str().unwrap().to_string(),
        run.to_str().unwrap().to_string(),
    )
}

#[test]
fn eval_writes_curves_summary_and_plot_and_rejects_bad_names() {
    let d = scratch("eval");
    let (bundle, run) = bundle_and_run(&d);
    let out = d.join("eval");
    let o = out.to_str().unwrap();
    let args = |problem: &str, optimizers: &str, seeds: &str| -> Vec<String> {
        [
            "eval",
            &run,
            "--bundle",
            &bundle,
            "--problem",
            problem,
            "--steps",
            "30",
            "--seeds",
            seeds,
            "--optimizers",
            optimizers,
            "--batch-size",
            "16",
            "--out",
            o,
            "--backend",
            "tract",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let call = |v: Vec<String>| metac(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let r = call(args("mnist-mlp", "learned,adam-1e-3,sgd-1e-1", "1,2"));
    ok(&r);
    let stdout = String::from_utf8_lossy(&r.stdout);
    for name in ["learned", "adam-1e-3", "sgd-1e-1"] {
        assert!(stdout.contains(name), "{stdout}");
    }

    // curves.csv: one row per optimizer, seed and recorded step.
    let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("optimizer,seed,step,loss"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(
        rows.len() <= 3 * 2 * 30 && rows.len() >= 2 * 2 * 30,
        "{} rows",
        rows.len()
    );
    for r in &rows {
        assert_eq!(r.len(), 4);
        assert!(["learned", "adam-1e-3", "sgd-1e-1"].contains(&r[0]));
        assert!(["1", "2"].contains(&r[1]));
        let step: usize = r[2].parse().unwrap();
        assert!((1..=30).contains(&step));
        assert!(r[3].parse::<f32>().unwrap().is_finite());
    }
    // The baselines cannot diverge in 30 small steps.
    for opt in ["adam-1e-3", "sgd-1e-1"] {
        assert_eq!(rows.iter().filter(|r| r[0] == opt).count(), 60, "{opt}");
    }

    // summary.json: the three optimizers, two seeds each.
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["problem"], "mnist-mlp");
    assert_eq!(s["split"], "test");
    assert_eq!(s["steps"], 30);
    assert_eq!(s["batch_size"], 16);
    let opts = s["optimizers"].as_array().unwrap();
    let names: Vec<&str> = opts
        .iter()
        .map(|o| o["optimizer"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["learned", "adam-1e-3", "sgd-1e-1"]);
    for o in &opts[1..] {
        assert_eq!(o["seeds"], serde_json::json!([1, 2]));
        assert_eq!(o["diverged"], 0);
        assert!(o["loss_at_1000"].is_null());
        let acc = o["eval_accuracy"]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{acc}");
        assert!(o["final_loss"]["mean"].as_f64().unwrap().is_finite());
    }

    // curves.png: a real PNG.
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert!(png.len() > 1024, "{} bytes", png.len());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));

    // Bad names: one line naming them, exit 2.
    let e = err_line(&call(args("nope", "adam-1e-3", "1")));
    assert!(e.contains("nope"), "{e}");
    let e = err_line(&call(args("mnist-mlp", "adam-x", "1")));
    assert!(e.contains("adam-x"), "{e}");
    let e = err_line(&call(args("mnist-mlp", "adam-1e-3", "1,x")));
    assert!(e.contains("'x'"), "{e}");
    let e = err_line(&call(args("quadratic", "adam-1e-3", "1")));
    assert!(e.contains("needs no data"), "{e}");
}

#[test]
fn learned_needs_a_run_and_a_bundle() {
    let d = scratch("no-run");
    let out = d.join("eval");
    let e = err_line(&metac(&[
        "eval",
        "--problem",
        "mnist-mlp",
        "--steps",
        "3",
        "--seeds",
        "1",
        "--optimizers",
        "learned",
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "tract",
    ]));
    assert!(e.contains("learned") && e.contains("run directory"), "{e}");
    assert!(!out.join("summary.json").exists());
}
