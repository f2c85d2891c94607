//! The HVP graph of a problem (`metac_compiler::hessian::build_hvp`) run
//! by the runtime's Lanczos, SLQ and Hutchinson loops
//! (`metac_runtime::hessian`) on tract: spectra against exact ones.

use metac_compiler::hessian::build_hvp;
use metac_compiler::metatest::to_onnx;
use metac_compiler::models::mlp::{Activation, Mlp};
use metac_compiler::models::problems::{problem_by_name, MlpProblem, Problem};
use metac_compiler::models::synthetic::Synthetic;
use metac_contract::io::HvpIo;
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions, Session};
use metac_runtime::data::mnist::Split;
use metac_runtime::hessian::{
    analyze, integral, symmetric_eigenvalues, Chunk, HvpOperator, Operator, Settings,
};
use metac_runtime::metatest::gather;
use metac_runtime::tensor::HostTensor;

fn session(problem: &dyn Problem) -> (Box<dyn Session>, HvpIo) {
    let h = build_hvp(problem);
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap();
    let s = backend
        .load(&to_onnx(&h.graph, "hvp").unwrap(), "hvp")
        .unwrap();
    (s, h.io)
}

/// The quadratic `1/2 ||Wx - y||^2` has Hessian `W^T W` everywhere: the
/// trace, top eigenvalues and SLQ nodes match its exact spectrum.
#[test]
fn quadratic_spectrum_matches_w_transpose_w() {
    let problem = problem_by_name("quadratic", 1).unwrap();
    let Synthetic::Quadratic { w, .. } =
        Synthetic::quadratic(20, metac_compiler::models::synthetic::DATA_SEED)
    else {
        unreachable!()
    };
    let (m, n) = (w.shape[0], w.shape[1]);
    let wv = w.as_f32().unwrap();
    let mut wtw = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            wtw[i * n + j] = (0..m)
                .map(|k| wv[k * n + i] as f64 * wv[k * n + j] as f64)
                .sum();
        }
    }
    let exact = symmetric_eigenvalues(&wtw, n);
    let trace: f64 = exact.iter().sum();

    let (s, io) = session(problem.as_ref());
    let mut op = HvpOperator::new(vec![s], io, vec![]).unwrap();
    let params: Vec<_> = problem
        .init_params(3)
        .iter()
        .map(HostTensor::from_graph)
        .collect();
    op.set_params(params).unwrap();
    // The graph's Hessian column by column is W^T W.
    for j in [0, 7, 19] {
        let mut e = vec![0.0; n];
        e[j] = 1.0;
        let col = op.apply(&e).unwrap();
        for i in 0..n {
            let want = wtw[i * n + j];
            assert!((col[i] - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
    }
    let s = Settings {
        probes: 200,
        top: 3,
        lanczos_steps: 20,
        slq_runs: 3,
        ..Settings::default()
    };
    let a = analyze(&mut op, &s, &mut |_| {}).unwrap();
    let se = a.trace.stderr.unwrap();
    assert!(
        (a.trace.mean - trace).abs() < 4.0 * se,
        "{} vs {trace} ({se})",
        a.trace.mean
    );
    for (i, v) in a.top.values.iter().enumerate() {
        let want = exact[n - 1 - i];
        assert!((v - want).abs() < 1e-4 * want, "{v} vs {want}");
    }
    let (lo, hi) = (exact[0], exact[n - 1]);
    for r in &a.slq {
        for &t in &r.nodes {
            assert!(
                t >= lo - 1e-3 * hi && t <= hi * (1.0 + 1e-4),
                "{t} outside [{lo}, {hi}]"
            );
        }
    }
    assert!((integral(&a.density) - 1.0).abs() < 1e-3);
}

/// Chunks of different sizes (two graphs) average to the HVP of the
/// whole set in one run.
#[test]
fn chunked_hvp_is_the_hvp_of_the_mean_loss() {
    let mlp = |batch| MlpProblem {
        name: "tiny".into(),
        mlp: Mlp::new(&[784, 3, 10], Activation::Sigmoid),
        batch,
    };
    let k = 5;
    let pixels = (0..k * 784).map(|i| ((i * 37) % 251) as u8).collect();
    let split = Split {
        pixels,
        labels: vec![3, 1, 4, 1, 5],
    };
    let params: Vec<_> = mlp(1)
        .init_params(1)
        .iter()
        .map(HostTensor::from_graph)
        .collect();
    let n: usize = params.iter().map(|p| p.num_elements()).sum();
    let v: Vec<f64> = (0..n).map(|i| ((i % 7) as f64 - 3.0) / 3.0).collect();

    let (s5, io) = session(&mlp(5));
    let (x, y) = gather(&split, 0..5);
    let mut whole = HvpOperator::new(
        vec![s5],
        io,
        vec![Chunk {
            session: 0,
            batch: vec![x, y],
            examples: 5,
        }],
    )
    .unwrap();
    whole.set_params(params.clone()).unwrap();
    let (l1, g1, h1) = whole.evaluate(&v).unwrap();

    let (s3, io) = session(&mlp(3));
    let (s2, _) = session(&mlp(2));
    let (x3, y3) = gather(&split, 0..3);
    let (x2, y2) = gather(&split, 3..5);
    let chunks = vec![
        Chunk {
            session: 0,
            batch: vec![x3, y3],
            examples: 3,
        },
        Chunk {
            session: 1,
            batch: vec![x2, y2],
            examples: 2,
        },
    ];
    let mut parts = HvpOperator::new(vec![s3, s2], io, chunks).unwrap();
    assert_eq!(parts.examples(), 5);
    parts.set_params(params).unwrap();
    let (l2, g2, h2) = parts.evaluate(&v).unwrap();
    assert_eq!(parts.graph_runs(), 2);
    assert!((l1 - l2).abs() < 1e-5);
    let close = |a: &[f64], b: &[f64]| {
        let scale = a.iter().map(|x| x.abs()).fold(0.0, f64::max);
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4 * scale)
    };
    assert!(close(&g1, &g2));
    assert!(close(&h1, &h2));
}
