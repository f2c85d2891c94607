//! Running the Python checks (the `onnx` package's checker, ONNX Runtime's
//! Python API) from Rust tests. They are part of the test suite: a missing
//! Python package is a failure with a message saying how to install it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Run a Python script from `tests/python/`, panicking with its output if it fails.
pub fn run_script(name: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(script(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); install Python 3 with: pip install -r requirements.txt",
                python()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} failed (are the Python requirements installed? pip install -r requirements.txt):\n{text}"
    );
    text
}

/// A fresh scratch directory `target/test-scratch/<name>-<pid>` (unique per
/// test process, so that concurrent `cargo test` runs do not collide).
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
