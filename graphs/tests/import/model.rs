//! The model level (`src/onnx/import/mod.rs`): initializers, and the errors of
//! bad models, unsupported ops and dynamic shapes.

use super::common::*;

#[test]
fn initializer_kinds() {
    // int32 shape initializer (read as int64), bool mask from int32_data,
    // float parameter from float_data, and an old-style initializer that is
    // also listed as a graph input.
    let shape = TensorProto {
        name: "shape".into(),
        dims: vec![2],
        data_type: 6,
        int32_data: vec![3, 2],
        ..Default::default()
    };
    let mask = TensorProto {
        name: "mask".into(),
        dims: vec![3, 2],
        data_type: 9,
        int32_data: vec![1, 0, 0, 1, 1, 1],
        ..Default::default()
    };
    let w = TensorProto {
        name: "w".into(),
        dims: vec![2],
        data_type: 1,
        float_data: vec![10.0, 20.0],
        ..Default::default()
    };
    let bias = tf32("bias", &[1], &[0.5]);
    let nodes = vec![
        node("Reshape", &["x", "shape"], &["r"], vec![]),
        node("Mul", &["r", "w"], &["rw"], vec![]),
        node("Add", &["rw", "bias"], &["rb"], vec![]),
        node("Constant", &[], &["zero"], vec![("value_float", A::F(0.0))]),
        node("Where", &["mask", "rb", "zero"], &["y"], vec![]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[6]), vinfo("bias", 1, &[1])],
        vec![shape, mask, w, bias],
        &["y"],
        13,
    );
    let m = import(&b);
    assert_eq!(m.data_inputs, ["x"]);
    let names: Vec<&str> = m.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "bias"]);
    assert!(m.graph.find_input("w").is_some() && m.graph.find_input("bias").is_some());
    assert!(m.graph.find_input("shape").is_none() && m.graph.find_input("mask").is_none());
    let o = run(&m, vec![("x", arange(&[6]))]);
    assert_close(&o["y"], &[3, 2], &[0.5, 0., 0., 60.5, 40.5, 100.5]);
}

#[test]
fn garbage_is_not_onnx() {
    for bytes in [
        &b"\xff\xfe this is certainly not a protobuf \x00\x01"[..],
        &b""[..],
        &b"hello"[..],
    ] {
        let e = import_bytes(bytes, "junk.bin").unwrap_err();
        assert!(matches!(e, ImportError::NotOnnx { .. }), "{e:?}");
        assert!(e.to_string().contains("junk.bin"), "{e}");
    }
    let e = import_file(std::path::Path::new("/nonexistent/model.onnx")).unwrap_err();
    assert!(
        matches!(e, ImportError::NotOnnx { .. })
            && e.to_string().contains("/nonexistent/model.onnx")
    );
}

#[test]
fn unsupported_op_is_named() {
    let mut nms = node("NonMaxSuppression", &["boxes", "scores"], &["sel"], vec![]);
    nms.name = "nms0".into();
    let b = model_bytes(
        vec![nms],
        vec![
            vinfo("boxes", 1, &[1, 4, 4]),
            vinfo("scores", 1, &[1, 1, 4]),
        ],
        vec![],
        &["sel"],
        18,
    );
    let e = import_bytes(&b, "nms.onnx").unwrap_err();
    match &e {
        ImportError::UnsupportedOp { file, op, node } => {
            assert_eq!(
                (file.as_str(), op.as_str(), node.as_str()),
                ("nms.onnx", "NonMaxSuppression", "nms0")
            )
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("NonMaxSuppression") && msg.contains("nms0") && msg.contains("nms.onnx"),
        "{msg}"
    );

    // An unnamed node is named by its first output.
    let mut es = node(
        "Einsum",
        &["boxes"],
        &["es_out"],
        vec![("equation", A::S("ij->ji"))],
    );
    es.name = String::new();
    let b = model_bytes(
        vec![es],
        vec![vinfo("boxes", 1, &[2, 3])],
        vec![],
        &["es_out"],
        18,
    );
    let e = import_bytes(&b, "e.onnx").unwrap_err();
    assert!(
        matches!(&e, ImportError::UnsupportedOp { node, op, .. } if node == "es_out" && op == "Einsum"),
        "{e:?}"
    );

    // Nodes the outputs do not need are not imported at all.
    let b = model_bytes(
        vec![
            node("NonMaxSuppression", &["x", "x"], &["dead"], vec![]),
            node("Relu", &["x"], &["y"], vec![]),
        ],
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["y"],
        18,
    );
    import(&b);
}

#[test]
fn dynamic_dims_are_rejected() {
    let mut x = vinfo("tokens", 1, &[0, 16]);
    if let Some(type_proto::Value::TensorType(t)) = x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[0].value = Some(
            tensor_shape_proto::dimension::Value::DimParam("batch".into()),
        );
    }
    let b = model_bytes(
        vec![node("Relu", &["tokens"], &["y"], vec![])],
        vec![x.clone()],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "dyn.onnx").unwrap_err().to_string();
    assert!(
        msg.contains("'tokens'") && msg.contains("axis 0") && msg.contains("batch"),
        "{msg}"
    );

    if let Some(type_proto::Value::TensorType(t)) = x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[1].value = None;
        t.shape.as_mut().unwrap().dim[0].value =
            Some(tensor_shape_proto::dimension::Value::DimValue(2));
    }
    let b = model_bytes(
        vec![node("Relu", &["tokens"], &["y"], vec![])],
        vec![x],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "dyn.onnx").unwrap_err().to_string();
    assert!(msg.contains("'tokens'") && msg.contains("axis 1"), "{msg}");
}

#[test]
fn other_errors_are_clear() {
    let relu = || vec![node("Relu", &["x"], &["y"], vec![])];
    let expect = |b: Vec<u8>, parts: &[&str]| {
        let msg = import_bytes(&b, "m.onnx").unwrap_err().to_string();
        for p in parts {
            assert!(msg.contains(p), "'{p}' not in: {msg}");
        }
    };
    // Element types.
    expect(
        model_bytes(relu(), vec![vinfo("x", 11, &[2])], vec![], &["y"], 18),
        &["'x'", "double"],
    );
    let half = TensorProto {
        name: "h".into(),
        dims: vec![1],
        data_type: 10,
        raw_data: vec![0, 0],
        ..Default::default()
    };
    expect(
        model_bytes(relu(), vec![vinfo("x", 1, &[2])], vec![half], &["y"], 18),
        &["'h'", "float16"],
    );
    // External data.
    let mut ext = tf32("big", &[2], &[]);
    ext.data_location = Some(1);
    ext.external_data = vec![pb::StringStringEntryProto {
        key: "location".into(),
        value: "weights.bin".into(),
    }];
    expect(
        model_bytes(relu(), vec![vinfo("x", 1, &[2])], vec![ext], &["y"], 18),
        &["'big'", "external"],
    );
    // Another domain.
    let mut n = node("FusedMatMul", &["x", "x"], &["y"], vec![]);
    n.domain = "com.microsoft".into();
    expect(
        model_bytes(vec![n], vec![vinfo("x", 1, &[2, 2])], vec![], &["y"], 18),
        &["com.microsoft", "FusedMatMul_y"],
    );
    // A shape operand that is not constant.
    let b = model_bytes(
        vec![node("Reshape", &["x", "s"], &["y"], vec![])],
        vec![vinfo("x", 1, &[6]), vinfo("s", 7, &[2])],
        vec![],
        &["y"],
        18,
    );
    expect(b, &["Reshape_y", "(Reshape)", "input 1", "constant"]);
    // Shape errors name the node.
    let b = model_bytes(
        vec![node("MatMul", &["x", "x"], &["y"], vec![])],
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["y"],
        18,
    );
    expect(b, &["MatMul_y", "inner dimensions"]);
    // Unsupported attribute values.
    let b = model_bytes(
        vec![node(
            "Gelu",
            &["x"],
            &["y"],
            vec![("approximate", A::S("cubic"))],
        )],
        vec![vinfo("x", 1, &[2])],
        vec![],
        &["y"],
        20,
    );
    expect(b, &["Gelu_y", "cubic"]);
}

/// Every supported op type has exactly one loader (the table refuses a
/// second), and the README lists exactly the supported ops.
#[test]
fn the_readme_lists_every_supported_op() {
    let ops = metac_graphs::onnx::import::supported_ops();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("Imported ONNX ops (")
        .expect("the README's op list");
    let text = &readme[start..];
    let list = &text[text.find("): ").unwrap() + 3..text.find('.').unwrap()];
    let listed: Vec<&str> = list.split(',').map(str::trim).collect();
    assert_eq!(listed, ops, "README.md's list of imported ONNX ops");
    let count: usize = text["Imported ONNX ops (".len()..text.find(',').unwrap()]
        .parse()
        .unwrap();
    assert_eq!(count, ops.len());
    for op in ["MatMul", "Gemm", "Softmax", "Trilu", "Range"] {
        assert!(ops.contains(&op), "{op}");
    }
}

#[test]
fn external_data_is_read_relative_to_the_model_and_checked() {
    // y = x * w + b with w and b stored in one external file (w at offset
    // 16, b after it), as torch.onnx.export(dynamo=True) writes models.
    let d = std::env::temp_dir().join(format!("metac-extdata-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("weights")).unwrap();
    let (w, b) = ([1.5f32, -2.0, 0.25], [10.0f32, 20.0, 30.0]);
    let mut data = vec![0u8; 16];
    for v in w.iter().chain(&b) {
        data.extend(v.to_le_bytes());
    }
    std::fs::write(d.join("weights/model.data"), &data).unwrap();
    let ext = |name: &str, location: &str, offset: usize, length: usize| TensorProto {
        name: name.into(),
        dims: vec![3],
        data_type: 1,
        data_location: Some(pb::tensor_proto::DataLocation::External as i32),
        external_data: [
            ("location", location.to_string()),
            ("offset", offset.to_string()),
            ("length", length.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| pb::StringStringEntryProto {
            key: k.into(),
            value: v,
        })
        .collect(),
        ..Default::default()
    };
    let write = |file: &str, wt: TensorProto, bt: TensorProto| {
        let bytes = model_bytes(
            vec![
                node("Mul", &["x", "w"], &["xw"], vec![]),
                node("Add", &["xw", "b"], &["y"], vec![]),
            ],
            vec![vinfo("x", 1, &[3])],
            vec![wt, bt],
            &["y"],
            18,
        );
        let p = d.join(file);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let good = write(
        "model.onnx",
        ext("w", "weights/model.data", 16, 12),
        ext("b", "weights/model.data", 28, 12),
    );
    let m = import_file(&good).unwrap();
    let names: Vec<&str> = m.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "b"]);
    let o = run(&m, vec![("x", fvalue(&[3], vec![1.0, 2.0, 4.0]))]);
    assert_close(&o["y"], &[3], &[11.5, 16.0, 31.0]);
    // Without the model's folder the data cannot be found: a clear error.
    let e = import_bytes(&std::fs::read(&good).unwrap(), "bytes").unwrap_err();
    assert!(e.to_string().contains("model.data"), "{e}");
    // Bad references name the tensor and the file.
    for (file, wt, want) in [
        (
            "missing.onnx",
            ext("w", "nowhere.data", 0, 12),
            "nowhere.data",
        ),
        (
            "short.onnx",
            ext("w", "weights/model.data", 36, 12),
            "has 40 bytes",
        ),
        (
            "outside.onnx",
            ext("w", "../model.data", 0, 12),
            "inside the model's folder",
        ),
    ] {
        let p = write(file, wt, ext("b", "weights/model.data", 28, 12));
        let e = import_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(file) && e.contains("tensor 'w'") && e.contains(want),
            "{e}"
        );
    }
}
