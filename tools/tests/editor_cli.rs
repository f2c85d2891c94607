//! `metac compile editor` and `metac run` of an editor bundle as a user
//! runs them: on a small language model trained first, the hypernetwork
//! learns to make edits succeed (ES and GS rise from 0), a resumed run ends
//! exactly where the uninterrupted one ends, and bad configs are one-line
//! errors naming the key or layer.

mod common;

use std::path::{Path, PathBuf};

use common::{err_line, metac, ok, root};

fn scratch(name: &str) -> PathBuf {
    common::scratch("editor-cli", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A trained small LM (configs/lm-tiny.toml) and an editor config for it.
fn setup(d: &Path) -> (PathBuf, String) {
    let lm_cfg = root().join("configs/lm-tiny.toml");
    let lm = d.join("lm");
    ok(&metac(&[
        "compile",
        "lm",
        "--config",
        s(&lm_cfg),
        "--out",
        s(&lm),
    ]));
    let run = d.join("lm-run");
    ok(&metac(&[
        "run",
        s(&lm),
        "--config",
        s(&lm_cfg),
        "--out",
        s(&run),
        "--quiet",
        "--unfused",
        "--epochs",
        "20",
    ]));
    let text = format!(
        "[lm]\nconfig = \"{}\"\nweights = \"{}\"\n\n\
         [editor]\nlayers = [\"l1.mlp.proj\", \"l0.mlp.proj\"]\nrank = 8\nlr_init = 1e-2\nchunk = 16\n\n\
         [meta]\nlr = 1e-3\nedit = 1.0\n\n\
         [run]\ntrajectories = 6\nbatches = 4\nedits = 8\naccumulate = 1\nvalidation_edits = 16\nevaluation_period = 2\n",
        s(&lm_cfg).replace('\\', "/"),
        s(&run.join("best.safetensors")).replace('\\', "/")
    );
    let cfg = d.join("editor.toml");
    std::fs::write(&cfg, &text).unwrap();
    (cfg, text)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    common::metrics_without(run, &["seconds", "edits_per_second"])
}

#[test]
fn the_editor_learns_to_edit_and_resumes_exactly() {
    let d = scratch("learn");
    let (cfg, _) = setup(&d);
    let bundle = d.join("editor");
    ok(&metac(&[
        "compile",
        "editor",
        "--config",
        s(&cfg),
        "--out",
        s(&bundle),
    ]));
    let m = json(&bundle.join("manifest.json"));
    assert_eq!(m["kind"], "editor");
    assert_eq!(m["meta"]["editor"]["layers"][0]["name"], "l1.mlp.proj");
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "run",
            s(&bundle),
            "--config",
            s(&cfg),
            "--out",
            s(out),
            "--quiet",
            "--unfused",
        ];
        a.extend(extra);
        ok(&metac(&a));
    };
    let whole = d.join("whole");
    run(&whole, &[]);
    let sm = json(&whole.join("summary.json"));
    let (before, after) = (&sm["before"], &sm["after"]);
    assert_eq!(
        before["es"], 0.0,
        "the unedited model gives the old answers"
    );
    assert!(before["ls"].as_f64().unwrap() > 0.9, "{before}");
    let (es, gs) = (after["es"].as_f64().unwrap(), after["gs"].as_f64().unwrap());
    assert!(es >= 0.3 && gs >= 0.2, "after meta-training: {after}");
    let lines = metrics(&whole);
    assert_eq!(lines.len(), 6);
    assert!(lines[1]["validation"]["es"].is_number());
    // The summary is of the best weights, normalisers included: it repeats
    // the best validation.
    let best = lines
        .iter()
        .filter(|l| l["validation_objective"].is_number())
        .min_by(|a, b| {
            let o = |l: &serde_json::Value| l["validation_objective"].as_f64().unwrap();
            o(a).total_cmp(&o(b))
        })
        .unwrap();
    for k in ["es", "gs", "ls"] {
        assert_eq!(best["validation"][k], after[k], "{k}: {best} vs {after}");
    }
    // Three trajectories, then three more on resume.
    let split = d.join("split");
    run(&split, &["--trajectories", "3"]);
    run(&split, &["--resume"]);
    assert_eq!(metrics(&split), lines);
    for f in ["best.safetensors", "checkpoint.safetensors"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(split.join(f)).unwrap(),
            "{f} differs"
        );
    }
    edit_with_the_run(&d, &whole);
    // An editor run needs its config; another workload's flags are refused.
    let e = err_line(&metac(&["run", s(&bundle), "--out", s(&d.join("x"))]));
    assert!(e.contains("--config"), "{e}");
    let e = err_line(&metac(&[
        "run",
        s(&bundle),
        "--config",
        s(&cfg),
        "--out",
        s(&d.join("y")),
        "--epochs",
        "2",
    ]));
    assert!(e.contains("--epochs"), "{e}");
}

/// `metac facts`, `metac edit` (the run's editor and FT) and `metac eval`
/// of the edited model, as a user runs them; bad facts files are one-line
/// errors naming the line, and leave what was written before alone.
fn edit_with_the_run(d: &Path, run: &Path) {
    let lm_cfg = root().join("configs/lm-tiny.toml");
    let facts = d.join("facts.jsonl");
    ok(&metac(&[
        "facts",
        "--config",
        s(&lm_cfg),
        "--edits",
        "12",
        "--out",
        s(&facts),
    ]));
    let text = std::fs::read_to_string(&facts).unwrap();
    assert_eq!(text.lines().count(), 12);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(
        first["prompt"].is_string() && first["target"].is_string(),
        "{first}"
    );
    assert_eq!(first["equivalent"].as_array().unwrap().len(), 2);

    let edited = d.join("edited");
    let edit = |out: &Path, facts: &Path, extra: &[&str]| {
        let mut a = vec![
            "edit",
            s(run),
            "--facts",
            s(facts),
            "--out",
            s(out),
            "--unfused",
        ];
        a.extend(extra);
        metac(&a)
    };
    ok(&edit(&edited, &facts, &[]));
    let rec = json(&edited.join("edit.json"));
    assert_eq!(rec["method"], "malmen");
    assert_eq!(rec["edits"], 12);
    assert_eq!(rec["before"]["es"], 0.0, "{rec}");
    let es = rec["after"]["es"].as_f64().unwrap();
    assert!(es >= 0.25, "the trained editor edits unseen facts: {rec}");
    // The facts as read, in the same format.
    assert_eq!(
        std::fs::read_to_string(edited.join("facts.jsonl")).unwrap(),
        text
    );
    // The edited weights are the LM's tensors, changed in the edited layers only.
    let base = PathBuf::from(rec["lm_weights"].as_str().unwrap());
    let read = |p: &Path| {
        metac_contract::bundle::read_safetensors(&std::fs::read(p).unwrap(), "w").unwrap()
    };
    let (b, e) = (read(&base), read(&edited.join("model.safetensors")));
    assert_eq!(b.keys().collect::<Vec<_>>(), e.keys().collect::<Vec<_>>());
    for (k, v) in &b {
        let changed = v != &e[k];
        assert_eq!(changed, k == "l1.mlp.proj.w" || k == "l0.mlp.proj.w", "{k}");
    }

    // metac eval of the edited model re-measures it from its files.
    ok(&metac(&["eval", s(&edited), "--unfused"]));
    let ev = json(&edited.join("eval.json"));
    for k in ["es", "gs", "ls"] {
        assert_eq!(ev["edited"][k], rec["after"][k], "{k}: {ev} vs {rec}");
        assert_eq!(ev["unedited"][k], rec["before"][k], "{k}");
    }
    let world = ev["world_train_templates"].as_array().unwrap();
    assert!(world[0].as_f64().unwrap() > 0.9, "{ev}");

    // The baseline: fine-tuning the edited layers reaches the edit prompts.
    let ft = d.join("edited-ft");
    ok(&edit(
        &ft,
        &facts,
        &["--method", "ft", "--ft-steps", "30", "--ft-lr", "1e-2"],
    ));
    let rf = json(&ft.join("edit.json"));
    assert_eq!(rf["method"], "ft");
    assert!(rf["after"]["es"].as_f64().unwrap() >= 0.5, "{rf}");

    // Bad facts: the line and the word, exit 2; the earlier edit stays.
    let before = std::fs::read(edited.join("model.safetensors")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let target = first["target"].as_str().unwrap();
    let prompt = first["prompt"].as_str().unwrap();
    let cases = [
        (format!("{}\n{{\"prompt\": ", lines[0]), "line 2"),
        (
            format!(
                "{}\n\n{}",
                lines[0],
                lines[1].replace("\"target\"", "\"object\"")
            ),
            "line 3",
        ),
        (lines[0].replacen(target, "zzzq", 1), "unknown word 'zzzq'"),
        (
            lines[0].replacen(prompt, &format!("{prompt} {prompt} {prompt}"), 1),
            "at most",
        ),
    ];
    let bad = d.join("bad.jsonl");
    for (content, want) in cases {
        std::fs::write(&bad, &content).unwrap();
        let e = err_line(&edit(&edited, &bad, &[]));
        assert!(e.contains("bad.jsonl") && e.contains(want), "{want}: {e}");
    }
    assert!(std::fs::read(edited.join("model.safetensors")).unwrap() == before);
    let e = err_line(&edit(&d.join("x"), &d.join("missing.jsonl"), &[]));
    assert!(e.contains("missing.jsonl"), "{e}");
    assert!(!d.join("x").exists());
}

#[test]
fn bad_editor_configs_name_the_key_or_layer() {
    let d = scratch("bad");
    let (_, text) = setup(&d);
    let cases = [
        (
            text.replace("\"l0.mlp.proj\"", "\"l7.mlp.proj\""),
            "'l7.mlp.proj'",
        ),
        (text.replace("rank = 8", "rank = 0"), "editor.rank"),
        (
            text.replace("chunk = 16", "chunk = 16\nsolver = \"lsq\""),
            "solver",
        ),
        (text.replace("lr = 1e-3", "lr = -1e-3"), "meta.lr"),
        (
            text.replace("edits = 8", "edits = 8\nedit_count = 3"),
            "edit_count",
        ),
        (
            text.replace("best.safetensors", "missing.safetensors"),
            "lm.weights",
        ),
        (
            text.replace("trajectories = 6", "trajectories = 0"),
            "run.trajectories",
        ),
        (
            text.replace("chunk = 16", "chunk = 16\nsolver = \"sum\"\npreserve = 32"),
            "editor.preserve",
        ),
    ];
    common::assert_compile_rejects("editor", &d, &cases);
    // The key regulariser (MEMIT's covariance) compiles and meta-trains.
    let cfg = d.join("preserve.toml");
    std::fs::write(
        &cfg,
        text.replace("chunk = 16", "chunk = 16\npreserve = 40")
            .replace("trajectories = 6", "trajectories = 2"),
    )
    .unwrap();
    let bundle = d.join("preserve-bundle");
    ok(&metac(&[
        "compile",
        "editor",
        "--config",
        s(&cfg),
        "--out",
        s(&bundle),
    ]));
    let m = json(&bundle.join("manifest.json"));
    assert_eq!(m["meta"]["editor"]["preserve"], 40);
    let run = d.join("preserve-run");
    ok(&metac(&[
        "run",
        s(&bundle),
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--quiet",
        "--unfused",
    ]));
    let sm = json(&run.join("summary.json"));
    assert!(sm["after"]["es"].as_f64().unwrap() > 0.0, "{sm}");
}
