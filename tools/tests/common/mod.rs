//! Helpers shared by the CLI tests: run the `metac` binary, scratch
//! directories, and the checks every user-facing error must pass.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn metac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metac"))
        .args(args)
        .output()
        .unwrap()
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh, empty directory `target/test-scratch/<suite>/<name>-<pid>`:
/// unique per test process, so that concurrent `cargo test` runs of the same
/// suite do not collide; emptied first in case the id was used before.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = root()
        .join("target/test-scratch")
        .join(suite)
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `metac compile l2o --config CONFIG --out OUT`, which must succeed.
pub fn compile_l2o(config: &Path, out: &Path) {
    ok(&metac(&[
        "compile",
        "l2o",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
}

/// The command succeeded (its output is shown if not).
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Bad input: exit code 2, no panic, exactly one line on stderr; returns it.
pub fn err_line(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "expected one line: {e}");
    e
}

/// `path` is a PNG image of at least 200 x 150 pixels (signature and IHDR
/// header read), as the plots are: not an empty or truncated file.
pub fn assert_png(path: &Path) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        b.len() > 1024 && b.starts_with(b"\x89PNG\r\n\x1a\n") && &b[12..16] == b"IHDR",
        "{}: not a PNG ({} bytes)",
        path.display(),
        b.len()
    );
    let dim = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    let (w, h) = (dim(16), dim(20));
    assert!(w >= 200 && h >= 150, "{}: {w} x {h} pixels", path.display());
}

/// `metrics.jsonl` of a run, without the fields in `drop` (wall-clock
/// measures, which differ between runs).
pub fn metrics_without(run: &Path, drop: &[&str]) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in drop {
                o.remove(*k);
            }
            v
        })
        .collect()
}

/// Each config text in `cases` makes `metac compile PROGRAM` fail with one
/// line naming its key, and writes no bundle.
pub fn assert_compile_rejects(program: &str, dir: &Path, cases: &[(String, &str)]) {
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = dir.join(format!("bad{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = dir.join(format!("b{i}"));
        let e = err_line(&metac(&[
            "compile",
            program,
            "--config",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        assert!(e.contains(key), "expected '{key}' in: {e}");
        assert!(
            !out.join("manifest.json").exists(),
            "no bundle is written for a bad config"
        );
    }
}
