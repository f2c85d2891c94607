//! `metac compare` as a user runs it: two evals of baselines on a data-free
//! problem side by side (rows, labels, mean curves against the evals' own
//! statistics), and evals that measure different things are refused with a
//! one-line error.

mod common;

use std::path::Path;

use common::{err_line, metac, ok};
use serde_json::Value;

fn eval(out: &Path, steps: &str, optimizers: &str) {
    eval_on(out, "quadratic", steps, optimizers)
}

fn eval_on(out: &Path, problem: &str, steps: &str, optimizers: &str) {
    ok(&metac(&[
        "eval",
        "--problem",
        problem,
        "--steps",
        steps,
        "--seeds",
        "1,2",
        "--optimizers",
        optimizers,
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "tract",
    ]));
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn evals_side_by_side() {
    let d = common::scratch("compare-cli", "two");
    let (a, b, short) = (d.join("a"), d.join("b"), d.join("short"));
    eval(&a, "60", "adam-1e-2,sgd-1e-2");
    eval(&b, "60", "adam-1e-1");
    eval(&short, "30", "adam-1e-2");
    let out = d.join("cmp");
    let arg = |p: &Path, label: &str| format!("{}={label}", p.display());
    let o = metac(&[
        "compare",
        &arg(&a, "first"),
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let c = json(&out.join("summary.json"));
    assert_eq!(c["problems"], serde_json::json!(["quadratic"]));
    assert_eq!(c["steps"], 60);
    let rows = c["rows"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    // Baselines are named by themselves (a learned optimizer by its eval's
    // label).
    assert_eq!(labels, ["adam-1e-2", "sgd-1e-2", "adam-1e-1"]);
    // The statistics are the eval's own.
    let sa = json(&a.join("summary.json"));
    assert_eq!(rows[1]["final_loss"], sa["optimizers"][1]["final_loss"]);
    common::assert_png(&out.join("curves.png"));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("sgd-1e-2"), "{table}");

    // --optimizers filters every eval.
    let o = metac(&[
        "compare",
        &arg(&a, "first"),
        &arg(&b, "second"),
        "--optimizers",
        "adam-1e-2,adam-1e-1",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let c = json(&out.join("summary.json"));
    let labels: Vec<&str> = c["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["adam-1e-2", "adam-1e-1"]);

    // The same baseline run alike by two evals is one row; a different
    // one is named by its eval's label. Another problem gets its own panel.
    let (a2, rb, rb2) = (d.join("a2"), d.join("rb"), d.join("rb2"));
    eval(&a2, "60", "adam-1e-2");
    eval_on(&rb, "rosenbrock", "60", "adam-1e-2");
    ok(&metac(&[
        "eval",
        "--problem",
        "rosenbrock",
        "--steps",
        "60",
        "--seeds",
        "3",
        "--optimizers",
        "adam-1e-2",
        "--out",
        rb2.to_str().unwrap(),
        "--backend",
        "tract",
    ]));
    let o = metac(&[
        "compare",
        &arg(&a, "first"),
        &arg(&a2, "again"),
        &arg(&rb, "first"),
        &arg(&rb2, "other seed"),
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let c = json(&out.join("summary.json"));
    assert_eq!(
        c["problems"],
        serde_json::json!(["quadratic", "rosenbrock"])
    );
    let rows: Vec<(&str, &str)> = c["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["problem"].as_str().unwrap(), r["label"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            ("quadratic", "adam-1e-2"),
            ("quadratic", "sgd-1e-2"),
            ("rosenbrock", "adam-1e-2"),
            ("rosenbrock", "other seed: adam-1e-2"),
        ]
    );
    common::assert_png(&out.join("curves.png"));

    // Different step counts are not comparable; the error names both.
    let e = err_line(&metac(&[
        "compare",
        a.to_str().unwrap(),
        short.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("short") && e.contains("30 steps"), "{e}");
    // A directory that is not an eval.
    let e = err_line(&metac(&[
        "compare",
        d.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("summary.json"), "{e}");
}
