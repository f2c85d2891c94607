//! Meta-test machinery end to end on real MNIST (test split) with tract:
//! train_step graphs for Adam, SGD and the HierarchicalRNN, the driver,
//! determinism, curves CSV, summary JSON and the PNG plot.

use std::sync::OnceLock;

use metac_compiler::metatest::{
    build_evaluate, build_train_step, run_init, to_onnx, MetaOptimizer,
};
use metac_compiler::models::baselines::{Adam, Baseline, Sgd};
use metac_compiler::models::hrnn::Hrnn;
use metac_compiler::models::problems::problem_by_name;
use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions, Session};
use metac_runtime::data::mnist::{self, Mnist};
use metac_runtime::metatest::{
    run_optimizer, Batches, EvalIo, Evaluation, MetaTestResults, RunInit, RunResult, StepData,
    TrainStepIo,
};
use metac_runtime::plot::{plot_curves_with, PlotOptions};

const BATCH: usize = 32;
const EVAL_BATCH: usize = 1000;

fn mnist() -> &'static Mnist {
    static M: OnceLock<Mnist> = OnceLock::new();
    M.get_or_init(|| mnist::load(&mnist::default_dir()).expect("MNIST in data/mnist"))
}

fn session(g: &metac_graphs::Graph, name: &str) -> Box<dyn Session> {
    let backend = open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap();
    backend.load(&to_onnx(g, name).unwrap(), name).unwrap()
}

struct Built {
    train: Box<dyn Session>,
    io: TrainStepIo,
    eval: Box<dyn Session>,
    eval_io: EvalIo,
}

fn build(opt: &MetaOptimizer) -> Built {
    let p = problem_by_name("mnist-mlp", BATCH).unwrap();
    let ts = build_train_step(p.as_ref(), opt);
    let pe = problem_by_name("mnist-mlp", EVAL_BATCH).unwrap();
    let ev = build_evaluate(pe.as_ref());
    Built {
        train: session(&ts.graph, "train_step"),
        io: ts.io,
        eval: session(&ev.graph, "evaluate"),
        eval_io: ev.io,
    }
}

fn init(
    label: &str,
    opt: &MetaOptimizer,
    seed: u64,
    phi: &[(String, metac_graphs::Tensor)],
) -> RunInit {
    let p = problem_by_name("mnist-mlp", BATCH).unwrap();
    run_init(label, p.as_ref(), opt, phi, seed)
}

fn run(
    b: &mut Built,
    label: &str,
    opt: &MetaOptimizer,
    seed: u64,
    steps: usize,
    evaluate: bool,
) -> RunResult {
    let test = &mnist().test;
    let batches = Batches::generate(test.len(), BATCH, steps, seed).unwrap();
    let i = init(label, opt, seed, &[]);
    let eval = evaluate.then(|| Evaluation {
        session: b.eval.as_mut(),
        io: &b.eval_io,
        split: Some(test),
    });
    let data = StepData::Mnist {
        split: test,
        batches: &batches,
    };
    run_optimizer(b.train.as_mut(), &b.io, &i, data, seed, eval)
        .unwrap()
        .0
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn batches_are_deterministic_and_cover_epochs() {
    let a = Batches::generate(100, 32, 7, 6).unwrap();
    let b = Batches::generate(100, 32, 7, 6).unwrap();
    let c = Batches::generate(100, 32, 7, 12).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.steps(), 7);
    // 3 batches per epoch, no repeats within an epoch.
    let mut e: Vec<u32> = a.indices[..96].to_vec();
    e.sort_unstable();
    e.dedup();
    assert_eq!(e.len(), 96);
}

#[test]
fn baselines_train_and_reports_are_written() {
    let adam = MetaOptimizer::Baseline(Baseline::Adam(Adam::with_lr(1e-3)));
    let sgd = MetaOptimizer::Baseline(Baseline::Sgd(Sgd {
        lr: 0.1,
        momentum: 0.0,
    }));
    let mut results = MetaTestResults {
        problem: "mnist-mlp".into(),
        split: Some("test".into()),
        batch_size: Some(BATCH),
        steps: 50,
        runs: vec![],
    };
    for (label, opt) in [("adam-1e-3", &adam), ("sgd-0.1", &sgd)] {
        let mut b = build(opt);
        assert!(b.io.phi.is_empty());
        let r = run(&mut b, label, opt, 6, 50, true);
        assert!(!r.diverged(), "{label} diverged: {r:?}");
        assert_eq!(r.losses.len(), 50);
        let (first, last) = (mean(&r.losses[..10]), mean(&r.losses[40..]));
        assert!(
            last < first,
            "{label}: loss did not decrease ({first} -> {last})"
        );
        let acc = r.eval_accuracy.unwrap();
        assert_eq!(r.eval_examples, 10_000);
        assert!((0.0..=1.0).contains(&acc), "{label}: accuracy {acc}");
        // Same seed, same curve (fresh state, same batches).
        let again = run(&mut b, label, opt, 6, 50, false);
        assert_eq!(again.losses, r.losses, "{label}: not deterministic");
        results.runs.push(r);
        results.runs.push(run(&mut b, label, opt, 12, 50, false));
    }

    let dir = std::env::temp_dir().join(format!("metac-metatest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("curves.csv");
    results.write_curves_csv(&csv).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("optimizer,seed,step,loss"));
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    assert_eq!(rows.len(), 4 * 50);
    for r in &rows {
        assert_eq!(r.len(), 4);
        r[1].parse::<u64>().unwrap();
        r[2].parse::<usize>().unwrap();
        assert!(r[3].parse::<f32>().unwrap().is_finite());
    }

    let js = dir.join("summary.json");
    results.write_summary_json(&js).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&js).unwrap()).unwrap();
    let opts = v["optimizers"].as_array().unwrap();
    assert_eq!(opts.len(), 2);
    assert_eq!(opts[0]["optimizer"], "adam-1e-3");
    assert_eq!(opts[0]["diverged"], 0);
    assert_eq!(opts[0]["final_loss"]["n"], 2);
    assert!(opts[0]["loss_at_1000"].is_null());
    assert_eq!(opts[0]["eval_accuracy"]["n"], 1);

    let png = dir.join("curves.png");
    let opts = PlotOptions {
        smoothing: 5,
        ..Default::default()
    };
    plot_curves_with(
        &png,
        "mnist-mlp (test split, batch 32)",
        &results.mean_curves(),
        &opts,
    )
    .unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1000);
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    if let Ok(keep) = std::env::var("METAC_KEEP_PLOT") {
        std::fs::copy(&png, keep).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hrnn_train_step_runs() {
    let hrnn = Hrnn::default();
    let phi = hrnn.weights().init(0);
    let opt = MetaOptimizer::Hrnn(hrnn);
    let p = problem_by_name("mnist-mlp", BATCH).unwrap();
    let ts = build_train_step(p.as_ref(), &opt);
    assert_eq!(ts.io.phi.len(), phi.len());
    let mut train = session(&ts.graph, "train_step");
    let test = &mnist().test;
    let batches = Batches::generate(test.len(), BATCH, 3, 6).unwrap();
    let i = init("hrnn", &opt, 6, &phi);
    let data = StepData::Mnist {
        split: test,
        batches: &batches,
    };
    let (r, _) = run_optimizer(train.as_mut(), &ts.io, &i, data, 6, None).unwrap();
    assert!(!r.diverged(), "{r:?}");
    assert_eq!(r.losses.len(), 3);
    assert!(r.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn data_free_problems_train_and_evaluate_without_a_split() {
    let hrnn = Hrnn::default();
    let phi = hrnn.weights().init(0);
    let adam = MetaOptimizer::Baseline(Baseline::Adam(Adam::with_lr(1e-2)));
    for (name, opt, phi, has_acc) in [
        ("rosenbrock", MetaOptimizer::Hrnn(hrnn), &phi[..], false),
        ("softmax-regression-random", adam, &[][..], true),
    ] {
        let p = problem_by_name(name, 0).unwrap();
        let ts = build_train_step(p.as_ref(), &opt);
        assert!(ts.io.batch.is_empty(), "{name}");
        let ev = build_evaluate(p.as_ref());
        assert_eq!(ev.io.accuracy.is_some(), has_acc, "{name}");
        let mut train = session(&ts.graph, "train_step");
        let mut eval = session(&ev.graph, "evaluate");
        let i = run_init(name, p.as_ref(), &opt, phi, 6);
        let evaluation = Evaluation {
            session: eval.as_mut(),
            io: &ev.io,
            split: None,
        };
        let data = StepData::DataFree { steps: 20 };
        let (r, params) =
            run_optimizer(train.as_mut(), &ts.io, &i, data, 6, Some(evaluation)).unwrap();
        assert!(!r.diverged(), "{name}: {r:?}");
        assert_eq!(r.losses.len(), 20);
        assert_eq!(r.eval_examples, 0);
        assert_eq!(r.eval_accuracy.is_some(), has_acc, "{name}");
        assert_eq!(params.len(), p.param_shapes().len());
        for (t, (_, s)) in params.iter().zip(p.param_shapes()) {
            assert_eq!(t.shape(), &s[..]);
        }
        // The evaluation is the loss at the final parameters: close to the
        // last step's loss (measured one update earlier).
        let (last, end) = (r.losses[19] as f64, r.eval_loss.unwrap());
        assert!(
            (end - last).abs() <= 0.5 * last.abs() + 1e-3,
            "{name}: {last} vs {end}"
        );
    }
}
