//! The PyTorch-exported fixtures reproduce torch's float64 loss, gradient and both
//! HVPs (raw and optimised graphs); an export/import round trip preserves
//! evaluations; the idioms of torch's exporter import.

use super::common::*;

#[test]
fn json_reader() {
    let j = Parser::parse(
        r#" {"a": [1, -2.5e-3, 3E2], "b": {"c": "x\"y\u0041"}, "d": [], "e": true, "f": null} "#,
    );
    assert_eq!(j.at("a").nums(), vec![1.0, -2.5e-3, 300.0]);
    assert_eq!(j.at("b").at("c").str(), "x\"yA");
    assert!(matches!(j.at("e"), Json::Bool(true)));
    assert!(matches!(j.at("f"), Json::Null));
    assert!(matches!(j.at("d"), Json::Arr(v) if v.is_empty()));
}

#[test]
fn fixtures_match_torch() {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let f = p.file_name()?.to_str()?.to_string();
            let stem = f.strip_suffix(".onnx")?.to_string();
            let has_loss = std::fs::read_to_string(format!("{FIXTURES}{stem}.ref.json"))
                .map(|s| s.contains("\"loss\""))
                .unwrap_or(false);
            (has_loss && (stem.ends_with("_opset18") || stem.ends_with("_opset20"))).then_some(stem)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "fixtures found: {names:?}");
    for n in &names {
        let (l, g, h) = check_fixture(n);
        println!("{n}: loss rel err {l:.2e}, grad {g:.2e}, hvp {h:.2e}");
    }
}

#[test]
fn logits_fixture_imports() {
    let model = import_file(std::path::Path::new(&format!(
        "{FIXTURES}mlp_logits_opset18.onnx"
    )))
    .unwrap();
    let r = Parser::parse(
        &std::fs::read_to_string(format!("{FIXTURES}mlp_logits_opset18.ref.json")).unwrap(),
    );
    assert_eq!(model.data_inputs, vec!["x".to_string()]);
    let out = model.graph.find_output("logits").unwrap();
    assert_eq!(model.graph.shape(out), &[8, 10]);
    if let Some(want) = r.get("logits") {
        let mut feeds = ref_inputs(&r);
        for (n, t) in &model.initializers {
            feeds.insert(n.clone(), Value::from_tensor(t));
        }
        let got = outputs_by_name(&model.graph, &feeds);
        let want = match want {
            Json::Obj(_) => want.at("data").nums(),
            _ => want.nums(),
        };
        let e = rel_err(&flat(&got["logits"]), &want, 1e-6);
        assert!(e < 1e-5, "logits rel err {e}");
    }
}

#[test]
fn export_import_round_trip() {
    for name in [
        "transformer_block_opset18",
        "convnet_opset18",
        "transformer_block_opset20",
        "poolnet_opset18",
        "groupnet_opset18",
    ] {
        let r =
            Parser::parse(&std::fs::read_to_string(format!("{FIXTURES}{name}.ref.json")).unwrap());
        let model = import_file(std::path::Path::new(&format!("{FIXTURES}{name}.onnx"))).unwrap();
        let feeds = fixture_feeds(&model, &r);
        // The model itself, then its optimised gradient and HVP graph
        // (which exercises the import of ConvTranspose, Fill, Identity...).
        round_trip(&model.graph, &feeds, name);
        let d = optimize(&derivative_graph(&model, false));
        let e = round_trip(&d, &feeds, &format!("{name}-derivatives"));
        println!("{name}: round trip of the derivative graph, max rel diff {e:.2e}");
    }
}

#[test]
fn torch_export_idioms() {
    // Constant(double) -> Cast(float); Trilu of a constant and of an input;
    // ReduceProd of a Shape (the element count).
    let half = TensorProto {
        dims: vec![],
        data_type: 11,
        double_data: vec![0.5],
        ..Default::default()
    };
    let nodes = vec![
        konst("h", half),
        node("Cast", &["h"], &["hf"], vec![("to", A::I(1))]),
        node("Mul", &["x", "hf"], &["xh"], vec![]),
        node("Trilu", &["xh"], &["up"], vec![]),
        konst("k", ti64("", &[], &[-1])),
        node("Trilu", &["x", "k"], &["lo"], vec![("upper", A::I(0))]),
        node("Shape", &["x"], &["s"], vec![]),
        node("ReduceProd", &["s"], &["n"], vec![("keepdims", A::I(0))]),
        node("Cast", &["n"], &["nf"], vec![("to", A::I(1))]),
        node("Div", &["x", "nf"], &["xn"], vec![]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["up", "lo", "xn"],
        18,
    );
    let m = import(&b);
    let o = run(&m, vec![("x", arange(&[2, 3]))]);
    assert_close(&o["up"], &[2, 3], &[0., 0.5, 1., 0., 2., 2.5]);
    assert_close(&o["lo"], &[2, 3], &[0., 0., 0., 3., 0., 0.]);
    assert_close(
        &o["xn"],
        &[2, 3],
        &[0., 1. / 6., 2. / 6., 3. / 6., 4. / 6., 5. / 6.],
    );
}
