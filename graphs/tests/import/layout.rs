//! Layout loaders (`src/onnx/import/layout.rs`).

use super::common::*;

#[test]
fn reshape_slice_gather_semantics() {
    let nodes = vec![
        konst("s", ti64("", &[2], &[0, -1])),
        node("Reshape", &["x", "s"], &["r"], vec![]),
        konst("st", ti64("", &[2], &[-100, 1])),
        konst("en", ti64("", &[2], &[2, i64::MAX])),
        konst("ax", ti64("", &[2], &[0, -1])),
        konst("sp", ti64("", &[2], &[1, 2])),
        node("Slice", &["r", "st", "en", "ax"], &["sl"], vec![]),
        node("Slice", &["r", "st", "en", "ax", "sp"], &["sl2"], vec![]),
        konst("i", ti64("", &[2], &[-1, 0])),
        node("Gather", &["x", "i"], &["g"], vec![("axis", A::I(1))]),
        node("Gather", &["x", "j"], &["gd"], vec![("axis", A::I(-1))]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3, 4]), vinfo("j", 7, &[2])],
        vec![],
        &["r", "sl", "sl2", "g", "gd"],
        18,
    );
    let m = import(&b);
    let j = Value::I(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, 1]).unwrap());
    let o = run(&m, vec![("x", arange(&[2, 3, 4])), ("j", j)]);
    assert_close(
        &o["r"],
        &[2, 12],
        &(0..24).map(|i| i as f64).collect::<Vec<_>>(),
    );
    let want: Vec<f64> = (1..12).chain(13..24).map(|i| i as f64).collect();
    assert_close(&o["sl"], &[2, 11], &want);
    assert_close(
        &o["sl2"],
        &[2, 6],
        &[1., 3., 5., 7., 9., 11., 13., 15., 17., 19., 21., 23.],
    );
    // x[:, [-1, 0], :]
    assert_close(
        &o["g"],
        &[2, 2, 4],
        &[
            8., 9., 10., 11., 0., 1., 2., 3., 20., 21., 22., 23., 12., 13., 14., 15.,
        ],
    );
    assert_close(
        &o["gd"],
        &[2, 3, 2],
        &[3., 1., 7., 5., 11., 9., 15., 13., 19., 17., 23., 21.],
    );

    // The gradient through a Gather with negative runtime indices.
    let mut g = m.graph.clone();
    let x = g.find_input("x").unwrap();
    let gd = g.find_output("gd").unwrap();
    let loss = g.sum_all(gd);
    let dx = grad(&mut g, loss, &[x])[0];
    g.set_outputs(vec![("dx".into(), dx)]);
    let j = Value::I(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, 1]).unwrap());
    let feeds = HashMap::from([("x".to_string(), arange(&[2, 3, 4])), ("j".to_string(), j)]);
    let d = outputs_by_name(&g, &feeds);
    assert_close(&d["dx"], &[2, 3, 4], &[0., 1., 0., 1.].repeat(6));
}

#[test]
fn scatter_nd_adds_rows_and_refuses_the_rest() {
    // data [4, 2] + rows of updates at [[1], [3], [1]] (repeats add up).
    let nodes = vec![
        konst("i", ti64("", &[3, 1], &[1, 3, 1])),
        node(
            "ScatterND",
            &["x", "i", "u"],
            &["y"],
            vec![("reduction", A::S("add"))],
        ),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[4, 2]), vinfo("u", 1, &[3, 2])],
        vec![],
        &["y"],
        18,
    );
    let m = import(&b);
    let o = run(&m, vec![("x", arange(&[4, 2])), ("u", arange(&[3, 2]))]);
    // x = [[0,1],[2,3],[4,5],[6,7]]; u = [[0,1],[2,3],[4,5]].
    assert_close(&o["y"], &[4, 2], &[0., 1., 6., 9., 4., 5., 8., 10.]);
    // Other reductions and element-wise indices are named in the error.
    for (reduction, idx_shape, want) in [
        ("mul", vec![3i64, 1], "reduction 'mul'"),
        ("add", vec![3, 2], "[k, 1]"),
    ] {
        let n = idx_shape.iter().product::<i64>() as usize;
        let nodes = vec![
            konst("i", ti64("", &idx_shape, &vec![0; n])),
            node(
                "ScatterND",
                &["x", "i", "u"],
                &["y"],
                vec![("reduction", A::S(reduction))],
            ),
        ];
        let b = model_bytes(
            nodes,
            vec![vinfo("x", 1, &[4, 2]), vinfo("u", 1, &[3])],
            vec![],
            &["y"],
            18,
        );
        let e = import_bytes(&b, "scatter.onnx").unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn split_to_sequence_and_sequence_at() {
    // torch.chunk / torch.split as dynamo exports them: a scalar chunk
    // length (the last piece shorter), explicit sizes, or single elements
    // with the axis dropped (keepdims=0); positions may count from the end.
    let pos = |name: &str, p: i64| konst(name, ti64("", &[], &[p]));
    let nodes = vec![
        konst("two", ti64("", &[], &[2])),
        node(
            "SplitToSequence",
            &["x", "two"],
            &["s"],
            vec![("axis", A::I(1))],
        ),
        pos("p0", 0),
        pos("plast", -1),
        node("SequenceAt", &["s", "p0"], &["a"], vec![]),
        node("SequenceAt", &["s", "plast"], &["b"], vec![]),
        konst("sizes", ti64("", &[2], &[1, 4])),
        node(
            "SplitToSequence",
            &["x", "sizes"],
            &["t"],
            vec![("axis", A::I(-1))],
        ),
        pos("p1", 1),
        node("SequenceAt", &["t", "p1"], &["c"], vec![]),
        node(
            "SplitToSequence",
            &["x"],
            &["u"],
            vec![("keepdims", A::I(0))],
        ),
        node("SequenceAt", &["u", "p1"], &["d"], vec![]),
    ];
    let m = import(&model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 5])],
        vec![],
        &["a", "b", "c", "d"],
        18,
    ));
    let o = run(&m, vec![("x", arange(&[2, 5]))]);
    assert_close(&o["a"], &[2, 2], &[0., 1., 5., 6.]);
    assert_close(&o["b"], &[2, 1], &[4., 9.]);
    assert_close(&o["c"], &[2, 4], &[1., 2., 3., 4., 6., 7., 8., 9.]);
    assert_close(&o["d"], &[5], &[5., 6., 7., 8., 9.]);
    // A position out of range is an error naming the node.
    let b = model_bytes(
        vec![
            node("SplitToSequence", &["x"], &["u"], vec![]),
            pos("p", 2),
            node("SequenceAt", &["u", "p"], &["y"], vec![]),
        ],
        vec![vinfo("x", 1, &[2, 5])],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "m.onnx").unwrap_err().to_string();
    assert!(
        msg.contains("SequenceAt_y") && msg.contains("out of range"),
        "{msg}"
    );
}
