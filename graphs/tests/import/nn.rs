//! Normalisation and loss loaders (`src/onnx/import/nn.rs`).

use super::common::*;

#[test]
fn cross_entropy_semantics() {
    let ln = f64::ln;
    let (l0, l1) = (ln(4.0), ln(4.0 / 3.0)); // -log softmax([0, ln 3])
    let ln3 = ln(3.0) as f32;
    let mk = |reduction: &'static str, ignore: Option<i64>, weight: bool| {
        let mut attrs = vec![("reduction", A::S(reduction))];
        if let Some(i) = ignore {
            attrs.push(("ignore_index", A::I(i)));
        }
        let ins: &[&str] = if weight {
            &["s", "y", "w"]
        } else {
            &["s", "y"]
        };
        let nodes = vec![node("SoftmaxCrossEntropyLoss", ins, &["loss", "lp"], attrs)];
        let inits = if weight {
            vec![tf32("w", &[2], &[1., 3.])]
        } else {
            vec![]
        };
        import(&model_bytes(
            nodes,
            vec![vinfo("s", 1, &[3, 2]), vinfo("y", 7, &[3])],
            inits,
            &["loss", "lp"],
            18,
        ))
    };
    let s = fvalue(
        &[3, 2],
        [0.0, ln3].repeat(3).iter().map(|&x| x as f64).collect(),
    );
    let lab = |v: Vec<i64>| Value::I(ArrayD::from_shape_vec(IxDyn(&[3]), v).unwrap());
    // (reduction, ignore_index, class weights, labels, loss shape, loss)
    type Case = (
        &'static str,
        Option<i64>,
        bool,
        Vec<i64>,
        Vec<usize>,
        Vec<f64>,
    );
    let cases: Vec<Case> = vec![
        (
            "mean",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![],
            vec![(l0 + l1) / 2.0],
        ),
        (
            "sum",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![],
            vec![l0 + l1],
        ),
        (
            "none",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![3],
            vec![l0, 0.0, l1],
        ),
        (
            "mean",
            None,
            false,
            vec![0, 1, 1],
            vec![],
            vec![(l0 + 2.0 * l1) / 3.0],
        ),
        ("mean", Some(1), false, vec![0, 1, 1], vec![], vec![l0]),
        (
            "mean",
            None,
            true,
            vec![0, 1, 1],
            vec![],
            vec![(l0 + 6.0 * l1) / 7.0],
        ),
        ("mean", Some(0), true, vec![0, 1, 1], vec![], vec![l1]),
    ];
    for (red, ign, w, labels, shape, want) in cases {
        let m = mk(red, ign, w);
        let o = run(&m, vec![("s", s.clone()), ("y", lab(labels))]);
        assert_close(&o["loss"], &shape, &want);
        assert_close(&o["lp"], &[3, 2], &[-l0, -l1].repeat(3));
    }
}
