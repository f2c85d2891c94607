//! `metac compile moe`, `metac run` of a MoE bundle and `metac sample` as a
//! user runs them, on the small text the project ships
//! (data/text/sample.txt): the hyper step lowers the held-out bits per byte,
//! a resumed run ends exactly where the uninterrupted one ends, sampling is
//! reproducible, and bad configs, corpora and prompts are one-line errors
//! with exit code 2.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_compile_rejects, err_line, metac, ok, root};

fn scratch(name: &str) -> PathBuf {
    common::scratch("moe-cli", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CONFIG: &str = r#"
[model]
context = 32
width = 16
layers = 2
heads = 2

[model.moe]
experts = 4
hidden = 8
budget = 0.5
min_k = 1
max_k = 3

[train]
mode = "hyper"
batch = 4
eval_batch = 4
lr = 1e-2
router_lr = 1e-2

[router]
kl = 0.1

[run]
steps = 60
steps_per_iteration = 10
evaluation_period = 2
eval_windows = 8
heldout_every = 8
seed = 3
"#;

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sample_text() -> PathBuf {
    root().join("data/text/sample.txt")
}

/// Compile `text` into `d/bundle` and return its config file and bundle.
fn compile(d: &Path, text: &str) -> (PathBuf, PathBuf) {
    let cfg = d.join("moe.toml");
    std::fs::write(&cfg, text).unwrap();
    let bundle = d.join("bundle");
    ok(&metac(&[
        "compile",
        "moe",
        "--config",
        s(&cfg),
        "--out",
        s(&bundle),
    ]));
    (cfg, bundle)
}

fn run(bundle: &Path, cfg: &Path, out: &Path, extra: &[&str]) {
    let text = sample_text();
    let mut args = vec![
        "run",
        s(bundle),
        "--config",
        s(cfg),
        "--data",
        s(&text),
        "--out",
        s(out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&metac(&args));
}

#[test]
fn the_hyper_step_learns_resumes_exactly_and_samples() {
    let d = scratch("learn");
    let (cfg, bundle) = compile(&d, CONFIG);
    let whole = d.join("whole");
    run(&bundle, &cfg, &whole, &[]);
    let lines = common::metrics_without(&whole, &["seconds", "tokens_per_second"]);
    assert_eq!(lines.len(), 6);
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    // Bytes start at ln 256 = 5.5 nats; the text's letters are learnt fast.
    assert!(
        loss(0) < 5.6 && loss(5) < 0.75 * loss(0),
        "{} -> {}",
        loss(0),
        loss(5)
    );
    let sm = json(&whole.join("summary.json"));
    let h = &sm["heldout"];
    let bpb = h["bits_per_byte"].as_f64().unwrap();
    assert!(bpb < 5.0, "held-out {bpb} bits/byte");
    for l in 0..2 {
        let k = h["mean_k"][l].as_f64().unwrap();
        assert!((1.0..=3.0).contains(&k), "block {l}: mean k {k}");
        let a = h["gating_accuracy"][l].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "block {l}: gating accuracy {a}");
        let usage: f64 = h["expert_tokens"][l]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        let tokens = (h["windows"].as_u64().unwrap() / 4 * 4 * 32) as f64;
        assert!(
            (usage / tokens - k).abs() < 1e-3,
            "block {l}: {usage} assignments"
        );
        assert_eq!(
            h["surprise"][l].as_array().unwrap().len(),
            tokens as usize * 4
        );
    }
    // The router's measurements are logged per step.
    assert!(lines[0]["train"]["gating_accuracy.l1"].is_number());
    assert!(lines[0]["train"]["router_loss.l0"].is_number());
    // 30 steps, then 30 more on resume (a constant schedule does not
    // depend on the run's length).
    let split = d.join("split");
    run(&bundle, &cfg, &split, &["--steps", "30"]);
    run(&bundle, &cfg, &split, &["--resume"]);
    assert_eq!(
        common::metrics_without(&split, &["seconds", "tokens_per_second"]),
        lines
    );
    for f in ["best.safetensors", "checkpoint.safetensors"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(split.join(f)).unwrap(),
            "{f} differs"
        );
    }
    // Sampling: greedy is deterministic, a seed fixes a temperature's draw.
    let sample = |extra: &[&str]| {
        let mut a = vec!["sample", s(&whole), "--prompt", "The ", "--bytes", "40"];
        a.extend_from_slice(extra);
        let o = metac(&a);
        ok(&o);
        String::from_utf8(o.stdout).unwrap()
    };
    let g1 = sample(&[]);
    assert!(g1.starts_with("The ") && g1.len() > 40, "{g1:?}");
    assert_eq!(g1, sample(&[]));
    let t1 = sample(&["--temperature", "1.0", "--seed", "1"]);
    assert_eq!(t1, sample(&["--temperature", "1.0", "--seed", "1"]));
    assert_ne!(t1, sample(&["--temperature", "1.0", "--seed", "2"]));
    let e = err_line(&metac(&["sample", s(&whole), "--prompt", ""]));
    assert!(e.contains("prompt"), "{e}");
}

#[test]
fn the_baselines_train_a_top2_mixture_and_a_dense_model_by_one_backward() {
    let d = scratch("baselines");
    let top2 = CONFIG
        .replace(
            "budget = 0.5\nmin_k = 1\nmax_k = 3",
            "budget = 1.0\nmin_k = 2\nmax_k = 2",
        )
        .replace("mode = \"hyper\"", "mode = \"joint\"\nbalance = 0.01")
        .replace("[router]\nkl = 0.1\n", "");
    let dense = CONFIG
        .replace(
            "[model.moe]\nexperts = 4\nhidden = 8\nbudget = 0.5\nmin_k = 1\nmax_k = 3\n",
            "",
        )
        .replace("heads = 2\n", "heads = 2\nswiglu = 16\n")
        .replace("mode = \"hyper\"", "mode = \"joint\"")
        .replace("[router]\nkl = 0.1\n", "");
    for (name, text) in [("top2", top2), ("dense", dense)] {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (cfg, bundle) = compile(&dir, &text);
        let out = dir.join("run");
        run(&bundle, &cfg, &out, &["--steps", "30"]);
        let sm = json(&out.join("summary.json"));
        let h = &sm["heldout"];
        assert!(h["bits_per_byte"].as_f64().unwrap() < 6.0, "{name}: {h}");
        let lines = common::metrics_without(&out, &["seconds", "tokens_per_second"]);
        if name == "top2" {
            for l in 0..2 {
                assert_eq!(h["mean_k"][l].as_f64(), Some(2.0), "{name}");
            }
            assert!(lines[0]["train"]["balance.l0"].as_f64().unwrap() > 0.0);
        } else {
            assert_eq!(h["mean_k"].as_array().unwrap().len(), 0, "{name}");
        }
        let o = metac(&["sample", s(&out), "--prompt", "A", "--bytes", "8"]);
        ok(&o);
    }
}

#[test]
fn bad_configs_corpora_and_flags_are_one_line_errors() {
    let d = scratch("bad");
    let cases: Vec<(String, &str)> = [
        ("experts = 4", "experts = 0", "'experts'"),
        ("budget = 0.5", "budget = 0.0", "'budget'"),
        ("budget = 0.5", "budget = 1.5", "'budget'"),
        ("max_k = 3", "max_k = 5", "'max_k'"),
        ("min_k = 1", "min_k = 4", "'min_k'"),
        ("batch = 4\n", "batch = 0\n", "'train.batch'"),
        ("steps = 60", "steps = 0", "'run.steps'"),
        ("kl = 0.1", "kl = -1.0", "'router.kl'"),
        ("heads = 2", "heads = 3", "'heads'"),
    ]
    .iter()
    .map(|(from, to, key)| {
        assert!(CONFIG.contains(from), "{from}");
        (CONFIG.replacen(from, to, 1), *key)
    })
    .collect();
    assert_compile_rejects("moe", &d, &cases);
    let (cfg, bundle) = compile(&d, CONFIG);
    let run_with = |data: &Path, cfg: &Path| {
        err_line(&metac(&[
            "run",
            s(&bundle),
            "--config",
            s(cfg),
            "--data",
            s(data),
            "--out",
            s(&d.join("r")),
        ]))
    };
    // Corpora: missing, binary, empty, too short for the context.
    let e = run_with(&d.join("nowhere.txt"), &cfg);
    assert!(e.contains("nowhere.txt"), "{e}");
    let bin = d.join("image.bin");
    std::fs::write(&bin, [0u8, 1, 2, 255, 0, 7]).unwrap();
    let e = run_with(&bin, &cfg);
    assert!(
        e.contains("image.bin") && e.contains("not a text file"),
        "{e}"
    );
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    let e = run_with(&empty, &cfg);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let short = d.join("short.txt");
    std::fs::write(&short, "one line\n\nand another\n").unwrap();
    let e = run_with(&short, &cfg);
    assert!(e.contains("short.txt") && e.contains("context"), "{e}");
    // A config whose context is not the compiled one.
    let longer = d.join("longer.toml");
    std::fs::write(&longer, CONFIG.replace("context = 32", "context = 64")).unwrap();
    let e = run_with(&sample_text(), &longer);
    assert!(e.contains("'model.context'"), "{e}");
    // Another workload's flags; a MoE flag on another bundle.
    let e = err_line(&metac(&[
        "run",
        s(&bundle),
        "--epochs",
        "3",
        "--out",
        s(&d.join("r")),
    ]));
    assert!(e.contains("--epochs") && e.contains("--steps"), "{e}");
    assert!(!d.join("r").join("checkpoint.safetensors").exists());
    // Sampling from something that is not a run.
    let e = err_line(&metac(&["sample", s(&d.join("nothing")), "--prompt", "a"]));
    assert!(e.contains("nothing"), "{e}");
}
