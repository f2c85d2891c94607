//! Pooling, LRN, and the ops that must not change a model silently
//! (`src/onnx/import/pool.rs`, `elementwise.rs`): what is rejected and why,
//! Mod folded on constants, Dropout as inference. The values over the ops'
//! attributes against ONNX Runtime are in `tests/tests/import_ops.rs`,
//! their derivatives in `tests/tests/gradcheck.rs`.

use super::common::*;

fn error(nodes: Vec<NodeProto>, x: &[i64], inits: Vec<TensorProto>, outs: &[&str]) -> String {
    let b = model_bytes(nodes, vec![vinfo("x", 1, x)], inits, outs, 18);
    import_bytes(&b, "m.onnx").unwrap_err().to_string()
}

#[test]
fn unsupported_pool_settings_are_named() {
    let ks = |k: Vec<i64>| vec![("kernel_shape", A::Is(k))];
    // MaxPool's Indices output.
    let msg = error(
        vec![node("MaxPool", &["x"], &["y", "i"], ks(vec![2, 2]))],
        &[1, 1, 4, 4],
        vec![],
        &["y", "i"],
    );
    assert!(
        msg.contains("MaxPool_y") && msg.contains("Indices"),
        "{msg}"
    );
    // 3-D pooling.
    let msg = error(
        vec![node("AveragePool", &["x"], &["y"], ks(vec![2, 2, 2]))],
        &[1, 1, 4, 4, 4],
        vec![],
        &["y"],
    );
    assert!(msg.contains("1-D and 2-D"), "{msg}");
    // A window larger than the padded input.
    let msg = error(
        vec![node("MaxPool", &["x"], &["y"], ks(vec![5, 1]))],
        &[1, 1, 4, 4],
        vec![],
        &["y"],
    );
    assert!(msg.contains("larger than the padded input"), "{msg}");
    // A window of padding only.
    let msg = error(
        vec![node(
            "MaxPool",
            &["x"],
            &["y"],
            vec![
                ("kernel_shape", A::Is(vec![2, 2])),
                ("pads", A::Is(vec![3, 0, 0, 0])),
            ],
        )],
        &[1, 1, 4, 4],
        vec![],
        &["y"],
    );
    assert!(msg.contains("padding only"), "{msg}");
    // The kernel is required.
    let msg = error(
        vec![node("MaxPool", &["x"], &["y"], vec![])],
        &[1, 1, 4, 4],
        vec![],
        &["y"],
    );
    assert!(msg.contains("kernel_shape"), "{msg}");
}

#[test]
fn dropout_runs_as_inference_and_training_mode_is_rejected() {
    let flag = |v: bool| TensorProto {
        name: "t".into(),
        dims: vec![],
        data_type: 9,
        int32_data: vec![v as i32],
        ..Default::default()
    };
    let ratio = || tf32("r", &[], &[0.3]);
    let drop = || node("Dropout", &["x", "r", "t"], &["y"], vec![]);
    // training_mode = false: the identity.
    let b = model_bytes(
        vec![drop()],
        vec![vinfo("x", 1, &[2, 3])],
        vec![ratio(), flag(false)],
        &["y"],
        18,
    );
    let m = import(&b);
    let o = run(&m, vec![("x", arange(&[2, 3]))]);
    assert_close(&o["y"], &[2, 3], &[0., 1., 2., 3., 4., 5.]);
    // training_mode = true: a random mask, rejected with the way out.
    let msg = error(vec![drop()], &[2, 3], vec![ratio(), flag(true)], &["y"]);
    assert!(
        msg.contains("Dropout_y") && msg.contains("training mode") && msg.contains("model.eval()"),
        "{msg}"
    );
    // training_mode given as a graph input: not known at import.
    let b = model_bytes(
        vec![drop()],
        vec![vinfo("x", 1, &[2, 3]), vinfo("t", 9, &[])],
        vec![ratio()],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "m.onnx").unwrap_err().to_string();
    assert!(
        msg.contains("training_mode") && msg.contains("'t'"),
        "{msg}"
    );
}

#[test]
fn mod_of_constants_folds_with_both_sign_rules() {
    let a = [7i64, -7, 7, -7, 6];
    let b = [3i64, 3, -3, -3, 4];
    let mk = |fmod: i64| {
        model_bytes(
            vec![
                konst("a", ti64("", &[5], &a)),
                konst("b", ti64("", &[5], &b)),
                node("Mod", &["a", "b"], &["m"], vec![("fmod", A::I(fmod))]),
                node("Cast", &["m"], &["y"], vec![("to", A::I(1))]),
            ],
            vec![],
            vec![],
            &["y"],
            18,
        )
    };
    // fmod = 0: the divisor's sign (Python's %); fmod = 1: the dividend's.
    for (fmod, want) in [(0, [1., 2., -2., -1., 2.]), (1, [1., -1., 1., -1., 2.])] {
        let m = import(&mk(fmod));
        let o = run(&m, vec![]);
        assert_close(&o["y"], &[5], &want);
    }
    // Mod of a graph input is not shape arithmetic.
    let b = model_bytes(
        vec![
            konst("b", ti64("", &[], &[2])),
            node("Mod", &["i", "b"], &["y"], vec![]),
        ],
        vec![vinfo("i", 7, &[3])],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "m.onnx").unwrap_err().to_string();
    assert!(msg.contains("Mod_y") && msg.contains("constants"), "{msg}");
}
