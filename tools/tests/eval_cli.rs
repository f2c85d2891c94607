//! `metac eval` as a user runs it: a tiny bundle meta-trained for one
//! iteration, then its learned optimizer and two baselines on MNIST test
//! batches and on data-free synthetic problems; the curves, summary, plot
//! and final parameters are written, and bad names are one-line errors with
//! exit status 2.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::{compile_l2o, err_line, metac, ok, root};
use metac_compiler::models::problems::problem_by_name;
use metac_contract::bundle::read_safetensors;

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("eval-cli", name)
}

/// A tiny bundle and a one-iteration run of it, made once per test process.
fn bundle_and_run() -> &'static (String, String) {
    static BR: OnceLock<(String, String)> = OnceLock::new();
    BR.get_or_init(|| {
        let d = scratch("bundle");
        let bundle = d.join("bundle");
        let run = d.join("run");
        let cfg = root().join("configs/tiny.toml");
        compile_l2o(&cfg, &bundle);
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
    })
}

fn call(v: &[String]) -> std::process::Output {
    metac(&v.iter().map(String::as_str).collect::<Vec<_>>())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// curves.csv as rows `[optimizer, seed, step, loss]`, header checked.
fn curves(out: &Path) -> Vec<Vec<String>> {
    let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("optimizer,seed,step,loss"));
    lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

/// `OUT/params/<optimizer>-seed<seed>.safetensors` holds exactly the
/// problem's parameters, with their shapes, all finite.
fn check_params(out: &Path, problem: &str, optimizer: &str, seed: u64) {
    let path = out
        .join("params")
        .join(format!("{optimizer}-seed{seed}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let got = read_safetensors(&bytes, "params").unwrap();
    let want = problem_by_name(problem, 16).unwrap().param_shapes();
    assert_eq!(got.len(), want.len(), "{}", path.display());
    for (name, shape) in &want {
        let t = got
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor '{name}'", path.display()));
        assert_eq!(&t.shape, shape, "{name}");
        assert!(t.as_f32().unwrap().iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn eval_writes_curves_summary_and_plot_and_rejects_bad_names() {
    let (bundle, run) = bundle_and_run();
    let out = scratch("eval");
    let o = out.to_str().unwrap();
    let args = |problem: &str, optimizers: &str, seeds: &str| -> Vec<String> {
        [
            "eval",
            run,
            "--bundle",
            bundle,
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
    let r = call(&args("mnist-mlp", "learned,adam-1e-3,sgd-1e-1", "1,2"));
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
    common::assert_png(&out.join("curves.png"));

    // The final parameters of every run that did not diverge.
    for opt in ["adam-1e-3", "sgd-1e-1"] {
        for seed in [1, 2] {
            check_params(&out, "mnist-mlp", opt, seed);
        }
    }

    // Bad names: one line naming them, exit 2; an unknown problem lists
    // the known ones.
    let e = err_line(&call(&args("nope", "adam-1e-3", "1")));
    assert!(e.contains("'nope'"), "{e}");
    for known in ["mnist-mlp", "quadratic", "rosenbrock", "logsumexp"] {
        assert!(e.contains(known), "{e}");
    }
    let e = err_line(&call(&args("mnist-mlp", "adam-x", "1")));
    assert!(e.contains("adam-x"), "{e}");
    let e = err_line(&call(&args("mnist-mlp", "adam-1e-3", "1,x")));
    assert!(e.contains("'x'"), "{e}");
    // The MNIST flags do not apply to data-free problems.
    let e = err_line(&call(&args("quadratic", "adam-1e-3", "1")));
    assert!(e.contains("data-free") && e.contains("--batch-size"), "{e}");
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

#[test]
fn baselines_on_a_data_free_problem() {
    let out = scratch("quadratic");
    let o = out.to_str().unwrap();
    let r = call(&strings(&[
        "eval",
        "--problem",
        "quadratic",
        "--steps",
        "300",
        "--seeds",
        "1,2",
        "--optimizers",
        "adam-1e-2,sgd-1e-2",
        "--out",
        o,
        "--backend",
        "tract",
    ]));
    ok(&r);

    let rows = curves(&out);
    assert_eq!(rows.len(), 2 * 2 * 300);
    let s = summary(&out);
    assert_eq!(s["problem"], "quadratic");
    assert_eq!(s["steps"], 300);
    assert!(s["split"].is_null() && s["batch_size"].is_null(), "{s}");
    let opts = s["optimizers"].as_array().unwrap();
    assert_eq!(opts.len(), 2);
    for o in opts {
        let name = o["optimizer"].as_str().unwrap();
        assert_eq!(o["diverged"], 0, "{name}");
        assert!(o["eval_accuracy"].is_null(), "{name}: not a classifier");
        // The loss decreased: the loss at the final parameters is below the
        // loss at the start (step 1) of every seed.
        let end = o["eval_loss"]["mean"].as_f64().unwrap();
        let start: Vec<f64> = rows
            .iter()
            .filter(|r| r[0] == name && r[2] == "1")
            .map(|r| r[3].parse().unwrap())
            .collect();
        assert_eq!(start.len(), 2);
        let start = start.iter().sum::<f64>() / 2.0;
        assert!(end < 0.5 * start, "{name}: {start} -> {end}");
        for seed in [1, 2] {
            check_params(&out, "quadratic", name, seed);
        }
    }
    common::assert_png(&out.join("curves.png"));

    // A data-free problem takes no split.
    let mut v = strings(&[
        "eval",
        "--problem",
        "rosenbrock",
        "--optimizers",
        "sgd-1e-3",
    ]);
    v.extend(strings(&[
        "--split",
        "test",
        "--out",
        o,
        "--backend",
        "tract",
    ]));
    let e = err_line(&call(&v));
    assert!(e.contains("data-free") && e.contains("--split"), "{e}");
}

#[test]
fn the_learned_optimizer_runs_on_a_data_free_problem() {
    let (bundle, run) = bundle_and_run();
    let out = scratch("rosenbrock");
    ok(&call(&strings(&[
        "eval",
        run,
        "--bundle",
        bundle,
        "--problem",
        "rosenbrock",
        "--steps",
        "40",
        "--seeds",
        "1,2",
        "--optimizers",
        "learned,adam-1e-2",
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "tract",
    ])));
    let s = summary(&out);
    assert_eq!(s["problem"], "rosenbrock");
    let opts = s["optimizers"].as_array().unwrap();
    assert_eq!(opts[0]["optimizer"], "learned");
    assert_eq!(opts[0]["seeds"], serde_json::json!([1, 2]));
    let rows = curves(&out);
    for opt in ["learned", "adam-1e-2"] {
        let n = rows.iter().filter(|r| r[0] == opt).count();
        assert_eq!(n, 2 * 40, "{opt}");
        for seed in [1, 2] {
            check_params(&out, "rosenbrock", opt, seed);
        }
    }
    assert!(rows
        .iter()
        .all(|r| r[3].parse::<f32>().unwrap().is_finite()));
}

/// A baseline on the bundle's own problem and batch size runs the step
/// compiled into the bundle; its curves equal those of the step `eval`
/// compiles itself (another batch size, or no bundle).
/// On the bundle's own problem and batch sizes, eval runs the bundle's
/// compiled steps (the learned optimizer's and the baselines') and its
/// evaluation graph, and draws the initial values from its init rules:
/// nothing of the program is rebuilt. `--compile` builds them all here
/// instead, with the same curves and final parameters bit for bit.
#[test]
fn the_bundle_runs_its_own_problem_and_compile_builds_the_same() {
    let (bundle, run_dir) = bundle_and_run();
    let run = |batch: &str, extra: &[&str], name: &str| {
        let out = scratch(name);
        let mut v = strings(&[
            "eval",
            run_dir,
            "--bundle",
            bundle,
            "--problem",
            "mnist-mlp",
            "--steps",
            "20",
            "--seeds",
            "3",
            "--optimizers",
            "learned,adam-1e-3,sgd-1e-3",
            "--batch-size",
            batch,
            "--out",
            out.to_str().unwrap(),
            "--backend",
            "tract",
        ]);
        v.extend(strings(extra));
        let o = call(&v);
        ok(&o);
        let params: Vec<Vec<u8>> = ["learned", "adam-1e-3", "sgd-1e-3"]
            .iter()
            .map(|l| std::fs::read(out.join(format!("params/{l}-seed3.safetensors"))).unwrap())
            .collect();
        (
            (curves(&out), summary(&out)["optimizers"].clone(), params),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (from_bundle, log) = run("8", &[], "from-bundle");
    for (label, graph) in [
        ("learned", "metatest.learned"),
        ("adam-1e-3", "baseline.adam-1e-3"),
        ("sgd-1e-3", "baseline.sgd-1e-3"),
    ] {
        assert!(
            log.contains(&format!("[{label}] loaded {graph} from the bundle")),
            "{log}"
        );
    }
    let (built, log) = run("8", &["--compile"], "compiled");
    assert!(log.contains("[learned] built train_step"), "{log}");
    assert!(log.contains("[adam-1e-3] built train_step"), "{log}");
    assert_eq!(from_bundle, built);
    // Another batch size or evaluation chunk: the bundle's graphs do not
    // fit, eval builds its own.
    for (batch, extra, name) in [
        ("16", &[][..], "other-batch"),
        ("8", &["--eval-batch-size", "500"][..], "other-eval-batch"),
    ] {
        let (_, log) = run(batch, extra, name);
        assert!(log.contains("[learned] built train_step"), "{log}");
        assert!(log.contains("[adam-1e-3] built train_step"), "{log}");
    }
}

#[test]
fn the_shipped_pretrained_optimizer_runs_and_a_mismatching_file_is_refused() {
    let d = scratch("pretrained");
    let bundle = d.join("bundle");
    compile_l2o(&root().join("configs/seed-rmsprop-1e-2.toml"), &bundle);
    let pretrained = root().join("pretrained/l2o-mnist-mlp");
    let out = d.join("eval");
    let args = |run: &Path, out: &Path| {
        strings(&[
            "eval",
            run.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--problem",
            "mnist-mlp",
            "--steps",
            "100",
            "--seeds",
            "1",
            "--optimizers",
            "learned,adam-1e-3",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    ok(&call(&args(&pretrained, &out)));
    let s = summary(&out);
    let loss = |i: usize| s["optimizers"][i]["final_loss"]["mean"].as_f64().unwrap();
    assert_eq!(s["optimizers"][0]["diverged"], 0);
    // Over the horizon it was meta-trained on it is ahead of Adam 1e-3 (the
    // mean loss of the 100 steps: 1.57 against 1.83 when this was written).
    assert!(
        loss(0) < 0.95 * loss(1),
        "learned {} vs adam {}",
        loss(0),
        loss(1)
    );
    // A file whose tensor does not fit the bundle's optimizer: named, exit 2.
    let bytes = std::fs::read(pretrained.join("best.safetensors")).unwrap();
    let mut t: Vec<(String, metac_graphs::Tensor)> = read_safetensors(&bytes, "best")
        .unwrap()
        .into_iter()
        .collect();
    let (name, bad) = t
        .iter_mut()
        .find(|(n, v)| n.starts_with("phi/") && v.shape.len() == 2)
        .unwrap();
    let v = bad.as_f32().unwrap();
    let cols = bad.shape[1];
    *bad = metac_graphs::Tensor::f32(&[bad.shape[0] - 1, cols], v[cols..].to_vec());
    let name = name.trim_start_matches("phi/").to_string();
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("best.safetensors"),
        metac_contract::bundle::write_safetensors(&t).unwrap(),
    )
    .unwrap();
    let e = err_line(&call(&args(&other, &d.join("eval2"))));
    assert!(e.contains(&name) && e.contains("shape"), "{e}");

    // `--learned` without --bundle: the optimizer's bundle is compiled from
    // the config.toml it ships, and the run is the same as with the bundle.
    let by_name = d.join("by-name");
    let mut a: Vec<String> = args(&pretrained, &by_name);
    a.retain(|x| x != bundle.to_str().unwrap() && x != "--bundle");
    a[1] = "--learned".into();
    a.insert(2, pretrained.to_str().unwrap().into());
    ok(&call(&a));
    assert!(by_name.join("bundle/manifest.json").is_file());
    let t = summary(&by_name);
    assert_eq!(
        t["optimizers"][0]["final_loss"],
        s["optimizers"][0]["final_loss"]
    );
    // RUN and --learned together are refused.
    let mut both = args(&pretrained, &d.join("eval3"));
    both.insert(2, "--learned".into());
    both.insert(3, pretrained.to_str().unwrap().into());
    assert_eq!(call(&both).status.code(), Some(2));
}
