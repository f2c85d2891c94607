//! `metac compile lm` and `metac run` of a language-model bundle as a user
//! runs them: the model learns a small fact world (its training templates
//! and the paraphrases it never saw), a resumed run ends exactly where the
//! uninterrupted run ends, and bad configs or flags are one-line errors.

mod common;

use std::path::{Path, PathBuf};

use common::{err_line, metac, ok, root};

fn scratch(name: &str) -> PathBuf {
    common::scratch("lm-cli", name)
}

fn compile(config: &Path, out: &Path) {
    ok(&metac(&[
        "compile",
        "lm",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    common::metrics_without(run, &["seconds", "prompts_per_second"])
}

fn summary(run: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    v
}

fn train(bundle: &Path, out: &Path, extra: &[&str]) {
    let cfg = root().join("configs/lm-tiny.toml");
    let mut args = vec![
        "run",
        bundle.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        // ONNX Runtime's own kernels: metac's fused kernels are unoptimised
        // in a debug build (tests/tests/transformer_backends.rs checks the
        // two agree on the model).
        "--unfused",
    ];
    args.extend(extra);
    ok(&metac(&args));
}

#[test]
fn the_model_learns_its_facts_and_a_resumed_run_ends_where_the_whole_one_does() {
    let d = scratch("learn");
    let bundle = d.join("bundle");
    compile(&root().join("configs/lm-tiny.toml"), &bundle);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["kind"], "lm");
    assert_eq!(m["meta"]["lm"]["model"]["width"], 32);

    let whole = d.join("whole");
    train(
        &bundle,
        &whole,
        &["--epochs", "16", "--evaluation-period", "4"],
    );
    let s = summary(&whole);
    let (t, h) = (
        s["train_template_accuracy"].as_f64().unwrap(),
        s["heldout_paraphrase_accuracy"].as_f64().unwrap(),
    );
    // Chance (the commonest object of a relation) is about a quarter.
    assert!(
        t > 0.9 && h > 0.8,
        "train-template {t}, held-out paraphrase {h}"
    );
    assert_eq!(s["weights"], "best.safetensors");
    assert_eq!(s["epochs"], 16);
    let lines = metrics(&whole);
    assert_eq!(lines.len(), 16);
    assert!(lines[3]["validation"]["heldout_accuracy"].is_number());
    assert!(lines[0].get("validation").is_none());
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    assert!(loss(15) < 0.3 * loss(0), "{} -> {}", loss(0), loss(15));

    // Eight epochs, then eight more on resume: the same metrics, weights and report.
    let split = d.join("split");
    train(
        &bundle,
        &split,
        &["--epochs", "8", "--evaluation-period", "4"],
    );
    train(
        &bundle,
        &split,
        &["--epochs", "16", "--evaluation-period", "4", "--resume"],
    );
    assert_eq!(metrics(&split), lines);
    for f in ["best.safetensors", "checkpoint.safetensors"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(split.join(f)).unwrap(),
            "{f} differs"
        );
    }
    assert_eq!(summary(&split), s);

    // A resume with another seed is refused; so is a run over a finished one.
    let e = err_line(&metac(&[
        "run",
        bundle.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
        "--resume",
        "--seed",
        "3",
    ]));
    assert!(e.contains("other settings"), "{e}");
    let e = err_line(&metac(&[
        "run",
        bundle.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
    ]));
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn bad_configs_and_flags_are_one_line_errors() {
    let d = scratch("bad");
    let base = std::fs::read_to_string(root().join("configs/lm-tiny.toml")).unwrap();
    let cases = [
        (base.replace("heads = 2", "heads = 3"), "'width'"),
        (base.replace("lr = 3e-3", "lr = -1.0"), "train.lr"),
        (
            base.replace("batch = 32", "batch = 32\nbatchsize = 3"),
            "batchsize",
        ),
        (base.replace("epochs = 30", "epochs = 0"), "run.epochs"),
        (base.replace("subjects = 120", "subjects = 2"), "4 subjects"),
        (base.replace("width = 32", "width = \"wide\""), "width"),
    ];
    common::assert_compile_rejects("lm", &d, &cases);
    // Flags of the other workload name themselves.
    let bundle = d.join("bundle");
    compile(&root().join("configs/lm-tiny.toml"), &bundle);
    let run = d.join("run");
    let e = err_line(&metac(&[
        "run",
        bundle.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--unroll-length",
        "5",
    ]));
    assert!(
        e.contains("--unroll-length") && e.contains("language-model"),
        "{e}"
    );
    let l2o = d.join("l2o");
    common::compile_l2o(&root().join("configs/tiny.toml"), &l2o);
    let e = err_line(&metac(&[
        "run",
        l2o.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--epochs",
        "3",
    ]));
    assert!(e.contains("--epochs") && e.contains("'l2o'"), "{e}");
}
