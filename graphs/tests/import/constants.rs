//! Constants and shape computations (`src/onnx/import/constants.rs`): they fold.

use super::common::*;

#[test]
fn shape_computations_fold() {
    // A dynamic-export style chain: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])).
    let nodes = vec![
        node("Shape", &["x"], &["s"], vec![]),
        konst("zero", ti64("", &[], &[0])),
        node("Gather", &["s", "zero"], &["s0"], vec![]),
        konst("ax", ti64("", &[1], &[0])),
        node("Unsqueeze", &["s0", "ax"], &["s0u"], vec![]),
        konst("m1", ti64("", &[1], &[-1])),
        node("Concat", &["s0u", "m1"], &["ns"], vec![("axis", A::I(0))]),
        node("Reshape", &["x", "ns"], &["y"], vec![]),
        node("Squeeze", &["u"], &["sq"], vec![("axes", A::Is(vec![1]))]),
        node(
            "Unsqueeze",
            &["sq"],
            &["us"],
            vec![("axes", A::Is(vec![0, -1]))],
        ),
        node(
            "Split",
            &["x"],
            &["p0", "p1"],
            vec![("axis", A::I(-1)), ("split", A::Is(vec![1, 3]))],
        ),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3, 4]), vinfo("u", 1, &[3, 1])],
        vec![],
        &["y", "us", "p0", "p1"],
        11,
    );
    let m = import(&b);
    let g = &m.graph;
    let y = g.find_output("y").unwrap();
    assert_eq!(g.shape(y), &[2, 12]);
    // Everything but the Reshape itself was folded away (no live shape ops).
    let live = metac_graphs::passes::dce(g);
    let ops: Vec<&str> = live
        .nodes()
        .iter()
        .map(|n| n.op.name())
        .filter(|&n| n != "Input")
        .collect();
    assert!(
        ops.iter().all(|&o| matches!(o, "Reshape" | "Slice")),
        "{ops:?}"
    );
    assert_eq!(g.shape(g.find_output("us").unwrap()), &[1, 3, 1]);
    let o = run(&m, vec![("x", arange(&[2, 3, 4])), ("u", arange(&[3, 1]))]);
    assert_close(&o["p0"], &[2, 3, 1], &[0., 4., 8., 12., 16., 20.]);
    assert_eq!(o["p1"].shape(), &[2, 3, 3]);
}
