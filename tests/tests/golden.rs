//! Artifact regression: the manifests of compiled bundles (which hold the
//! content hash of every graph) are compared with golden copies in
//! `tests/golden/`, so an unintended change of a compiled graph fails.
//! Regenerate after an intended change with
//! `METAC_UPDATE_GOLDEN=1 cargo test -p metac-tests --test golden`.

use std::path::{Path, PathBuf};

use metac_compiler::derive::{derive, HvpMode};
use metac_contract::bundle::{Bundle, BundleBuilder, Port, StateBuffer};
use metac_graphs::onnx::import_file;
use metac_tests::fixtures;
use metac_tests::python::scratch;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.manifest.json"))
}

fn derive_bundle(model_name: &str, wrt: &[&str], dir: &Path) {
    let model = import_file(&fixtures::dir().join(format!("{model_name}.onnx"))).unwrap();
    let wrt: Vec<String> = wrt.iter().map(|s| s.to_string()).collect();
    let d = derive(&model, "loss", &wrt, HvpMode::ForwardOverReverse).unwrap();
    let mut b = BundleBuilder::new("derive");
    b.meta(serde_json::json!({ "source": model_name, "loss": "loss", "wrt": wrt }));
    b.graph("grad", &d.grad)
        .unwrap()
        .graph("hvp", &d.hvp)
        .unwrap();
    for (n, t) in model.initializers.iter().filter(|(n, _)| wrt.contains(n)) {
        b.init_tensor(n, t.clone()).state(StateBuffer {
            name: n.clone(),
            dtype: "f32".into(),
            shape: t.shape.clone(),
            init: Some(n.clone()),
            reads: vec![
                Port {
                    graph: "grad".into(),
                    tensor: n.clone(),
                },
                Port {
                    graph: "hvp".into(),
                    tensor: n.clone(),
                },
            ],
            updated_by: None,
        });
    }
    b.write(dir).unwrap();
}

fn check_golden(name: &str, dir: &Path) {
    let got = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let path = golden(name);
    if std::env::var_os("METAC_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing {}; create it with METAC_UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert!(
        got == want,
        "compiled bundle '{name}' differs from {}.\nIf the change is intended, regenerate with METAC_UPDATE_GOLDEN=1 and review the diff.\n--- got ---\n{got}",
        path.display()
    );
}

#[test]
fn derived_mlp_and_convnet_bundles_match_golden_manifests() {
    let cases: [(&str, &str, &[&str]); 2] = [
        (
            "derive-mlp",
            "mlp_ce_opset18",
            &["l1.weight", "l1.bias", "l2.weight", "l2.bias"],
        ),
        (
            "derive-convnet",
            "convnet_opset18",
            &["c1.weight", "c2.weight", "fc.weight"],
        ),
    ];
    for (name, model, wrt) in cases {
        let dir = scratch(name);
        derive_bundle(model, wrt, &dir);
        // Compiling twice gives identical bytes.
        let again = scratch(&format!("{name}-again"));
        derive_bundle(model, wrt, &again);
        for f in ["grad.onnx", "hvp.onnx", "init.safetensors", "manifest.json"] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(again.join(f)).unwrap(),
                "{name}/{f} is not deterministic"
            );
        }
        Bundle::load(&dir).unwrap();
        check_golden(name, &dir);
    }
}

#[test]
fn tampered_or_mismatched_bundles_are_rejected_with_the_file_named() {
    let dir = scratch("tamper");
    derive_bundle("mlp_ce_opset18", &["l1.weight", "l2.bias"], &dir);
    Bundle::load(&dir).unwrap();
    let fresh = |tag: &str| {
        let d = scratch(&format!("tamper-{tag}"));
        for f in ["grad.onnx", "hvp.onnx", "init.safetensors", "manifest.json"] {
            std::fs::copy(dir.join(f), d.join(f)).unwrap();
        }
        d
    };
    let err = |d: &Path| format!("{:#}", Bundle::load(d).err().expect("load must fail"));

    // A graph file modified after compilation.
    let d = fresh("graph");
    let mut bytes = std::fs::read(d.join("grad.onnx")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(d.join("grad.onnx"), bytes).unwrap();
    let e = err(&d);
    assert!(e.contains("grad.onnx") && e.contains("hash"), "{e}");

    // Initial values modified.
    let d = fresh("init");
    let mut bytes = std::fs::read(d.join("init.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(d.join("init.safetensors"), bytes).unwrap();
    assert!(err(&d).contains("init.safetensors"));

    // A manifest whose shapes no longer match its graph.
    let d = fresh("shape");
    let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    std::fs::write(d.join("manifest.json"), m.replacen("784", "785", 1)).unwrap();
    let e = err(&d);
    assert!(
        e.contains("manifest") || e.contains("does not match"),
        "{e}"
    );

    // A bundle from another version of metac.
    let d = fresh("version");
    let m = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    let m = m.replace(
        &format!("\"metac_version\": \"{}\"", env!("CARGO_PKG_VERSION")),
        "\"metac_version\": \"0.0.1\"",
    );
    std::fs::write(d.join("manifest.json"), m).unwrap();
    let e = err(&d);
    assert!(e.contains("0.0.1") && e.contains("recompile"), "{e}");

    // Not a bundle at all.
    let d = scratch("tamper-empty");
    assert!(err(&d).contains("manifest.json"));
}
