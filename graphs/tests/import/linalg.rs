//! Linear-algebra loaders (`src/onnx/import/linalg.rs`).

use super::common::*;

#[test]
fn matmul_gemm_semantics() {
    let nodes = vec![
        node("MatMul", &["a", "b"], &["vm"], vec![]),
        node("MatMul", &["a", "a"], &["vv"], vec![]),
        node("MatMul", &["b3", "a"], &["mv"], vec![]),
        node(
            "Gemm",
            &["ga", "gb", "gc"],
            &["gemm"],
            vec![
                ("alpha", A::F(2.0)),
                ("beta", A::F(0.5)),
                ("transA", A::I(1)),
                ("transB", A::I(1)),
            ],
        ),
    ];
    let inits = vec![
        tf32("b", &[3, 2], &[1., 0., 0., 1., 1., 1.]),
        tf32(
            "b3",
            &[2, 2, 3],
            &[1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 1.],
        ),
        tf32("ga", &[3, 2], &[1., 2., 3., 4., 5., 6.]),
        tf32("gb", &[2, 3], &[1., 0., 1., 0., 1., 0.]),
        tf32("gc", &[2], &[1., -1.]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("a", 1, &[3])],
        inits,
        &["vm", "vv", "mv", "gemm"],
        18,
    );
    let m = import(&b);
    let names: Vec<&str> = m.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "b3", "ga", "gb", "gc"]);
    let o = run(&m, vec![("a", fvalue(&[3], vec![1., 2., 3.]))]);
    assert_close(&o["vm"], &[2], &[4., 5.]);
    assert_close(&o["vv"], &[], &[14.]);
    assert_close(&o["mv"], &[2, 2], &[1., 2., 3., 6.]);
    assert_close(&o["gemm"], &[2, 2], &[12.5, 5.5, 16.5, 7.5]);
}
