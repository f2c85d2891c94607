//! The `metac` binary as a user runs it: `derive`, `inspect`, `--help`, and
//! bad input (one-line errors, exit code 2, no panics).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::metac;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/onnx")
        .join(name)
        .display()
        .to_string()
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli", name)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Bad input: exit code 2, exactly one line on stderr that contains `needle`.
fn assert_user_error(o: &Output, needle: &str) {
    let err = common::err_line(o);
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn derive_writes_grad_and_hvp_graphs_and_inspect_shows_them() {
    let out = scratch("derive-mlp");
    let o = metac(&[
        "derive",
        &fixture("mlp_ce_opset18.onnx"),
        "--loss",
        "loss",
        "--wrt",
        "l1.weight,l1.bias",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}{se}");
    for f in ["grad.onnx", "hvp.onnx", "init.safetensors", "manifest.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let o = metac(&["inspect", out.to_str().unwrap()]);
    let (so, _) = text(&o);
    assert!(o.status.success());
    for needle in [
        "graph grad",
        "graph hvp",
        "grad_l1.weight",
        "[20, 784]",
        "v_l1.bias",
        "hvp_l1.bias",
        "ops:",
        "state buffers (2 tensors, 15700 numbers)",
    ] {
        assert!(
            so.contains(needle),
            "inspect output lacks '{needle}':\n{so}"
        );
    }
    let o = metac(&["inspect", &fixture("convnet_opset18.onnx")]);
    let (so, _) = text(&o);
    assert!(o.status.success());
    assert!(
        so.contains("Conv 2") && so.contains("parameters (float initializers): 4266"),
        "{so}"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_code_2() {
    let out = scratch("bad");
    let o = out.to_str().unwrap();
    let not_onnx = out.join("notes.onnx");
    std::fs::write(&not_onnx, b"this is not a protobuf at all \xff\xff\xff").unwrap();
    let mlp = fixture("mlp_ce_opset18.onnx");
    assert_user_error(
        &metac(&[
            "derive",
            not_onnx.to_str().unwrap(),
            "--loss",
            "loss",
            "--wrt",
            "a",
            "--out",
            o,
        ]),
        "not an ONNX model",
    );
    assert_user_error(
        &metac(&[
            "derive",
            "/nonexistent.onnx",
            "--loss",
            "loss",
            "--wrt",
            "a",
            "--out",
            o,
        ]),
        "/nonexistent.onnx",
    );
    assert_user_error(
        &metac(&[
            "derive",
            &mlp,
            "--loss",
            "los",
            "--wrt",
            "l1.weight",
            "--out",
            o,
        ]),
        "--loss 'los'",
    );
    assert_user_error(
        &metac(&[
            "derive",
            &mlp,
            "--loss",
            "loss",
            "--wrt",
            "l9.weight",
            "--out",
            o,
        ]),
        "--wrt 'l9.weight'",
    );
    assert_user_error(
        &metac(&["derive", &mlp, "--loss", "loss", "--wrt", "y", "--out", o]),
        "--wrt 'y'",
    );
    assert_user_error(
        &metac(&[
            "derive",
            &fixture("mlp_logits_opset18.onnx"),
            "--loss",
            "logits",
            "--wrt",
            "l1.weight",
            "--out",
            o,
        ]),
        "must be a scalar",
    );
    assert_user_error(
        &metac(&["inspect", "/nonexistent-bundle"]),
        "/nonexistent-bundle",
    );
    assert_user_error(
        &metac(&["bench", "mlp", "--backends", "cuda"]),
        "unknown backend",
    );
}

#[test]
fn unsupported_op_names_the_op_and_node() {
    // A model with an op metac does not import, written with the ONNX protobuf types.
    use metac_graphs::onnx::pb;
    use prost::Message;
    let vi = |n: &str| {
        metac_graphs::onnx::export::value_info(n, &metac_graphs::TensorType::f32(&[2, 2]))
    };
    let m = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: vec![pb::NodeProto {
                op_type: "Hardmax".into(),
                name: "the_hardmax".into(),
                input: vec!["x".into()],
                output: vec!["loss".into()],
                ..Default::default()
            }],
            input: vec![vi("x")],
            output: vec![vi("loss")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = scratch("unsupported");
    let p = dir.join("m.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let o = metac(&[
        "derive",
        p.to_str().unwrap(),
        "--loss",
        "loss",
        "--wrt",
        "x",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_user_error(&o, "Hardmax");
    let (_, e) = text(&o);
    assert!(e.contains("the_hardmax"), "{e}");
}

#[test]
fn every_subcommand_help_has_examples() {
    for args in [
        vec!["--help"],
        vec!["derive", "--help"],
        vec!["inspect", "--help"],
        vec!["bench", "--help"],
    ] {
        let o = metac(&args);
        let (so, _) = text(&o);
        assert!(
            o.status.success() && so.contains("Examples:"),
            "{args:?}:\n{so}"
        );
    }
}
