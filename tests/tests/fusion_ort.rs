//! ONNX Runtime with metac's fused elementwise kernel (the CPU default)
//! computes what ONNX Runtime computes op by op: the L2O graphs of the
//! HierarchicalRNN on the MNIST MLP, without and with the Hutchinson
//! regulariser, on the same inputs; and the objective over a large set,
//! written by columns and fused, is the row-major loss and its gradient.

use metac_compiler::l2o::config::L2oConfig;
use metac_compiler::l2o::program::L2oProgram;
use metac_compiler::models::problems::{problem_by_name, Problem};
use metac_graphs::fusion::fuse_onnx;
use metac_graphs::onnx::export::export_bytes;
use metac_graphs::{DType, Graph, NodeId};
use metac_runtime::backend::{open_backend, Backend, BackendChoice, BackendOptions};
use metac_runtime::tensor::HostTensor;
use ndarray::{ArrayD, IxDyn};

fn config(name: &str) -> L2oConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    let mut cfg = L2oConfig::load(&path).unwrap();
    cfg.batch_size = 8;
    cfg.objective_examples = 64;
    cfg
}

/// Deterministic values in [lo, hi).
fn filled(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// The graph's inputs: the program's initial meta-parameters, parameters
/// and state, pixels in [0, 1), labels, and small cotangents and probes.
fn inputs(prog: &L2oProgram, g: &Graph) -> Vec<(String, HostTensor)> {
    let init: Vec<(String, metac_graphs::Tensor)> = prog
        .init_phi(1)
        .into_iter()
        .chain(prog.init_theta(1))
        .chain(prog.init_state(1))
        .collect();
    g.inputs()
        .into_iter()
        .enumerate()
        .map(|(k, (name, id))| {
            let ty = g.ty(id);
            if let Some((_, t)) = init.iter().find(|(n, _)| *n == name) {
                return (name, HostTensor::from_graph(t));
            }
            let t = match ty.dtype {
                DType::I64 => HostTensor::I64(
                    ArrayD::from_shape_vec(
                        IxDyn(&ty.shape),
                        filled(&ty.shape, k as u64, 0.0, 10.0)
                            .into_iter()
                            .map(|v| v as i64)
                            .collect(),
                    )
                    .unwrap(),
                ),
                _ => {
                    let (lo, hi) = if name.ends_with(".x") {
                        (0.0, 1.0)
                    } else {
                        (-0.1, 0.1)
                    };
                    HostTensor::F32(
                        ArrayD::from_shape_vec(
                            IxDyn(&ty.shape),
                            filled(&ty.shape, k as u64, lo, hi),
                        )
                        .unwrap(),
                    )
                }
            };
            (name, t)
        })
        .collect()
}

/// ONNX Runtime, fused or op by op (the test command installs it:
/// `pip install -r requirements.txt`).
fn ort(unfused: bool) -> Box<dyn Backend> {
    open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        unfused,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("ONNX Runtime (pip install -r requirements.txt): {e:#}"))
}

#[test]
fn fused_and_op_by_op_onnx_runtime_agree() {
    let (fused, plain) = (ort(false), ort(true));
    for cfg_name in ["tiny.toml", "hessian.toml"] {
        let prog = L2oProgram::from_config(&config(cfg_name)).unwrap();
        for (name, g) in [
            ("step", prog.step_graph()),
            ("step_vjp", prog.step_vjp_graph()),
            ("objective_chunk", prog.objective_chunk_graph()),
        ] {
            let what = format!("{cfg_name} {name}");
            let bytes = export_bytes(&g, name).unwrap();
            assert!(
                fuse_onnx(&bytes, name).unwrap().is_some(),
                "{what}: nothing was fused"
            );
            let ins = inputs(&prog, &g);
            let refs: Vec<(&str, &HostTensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let a = fused.load(&bytes, name).unwrap().run(&refs).unwrap();
            let b = plain.load(&bytes, name).unwrap().run(&refs).unwrap();
            assert_eq!(a.len(), b.len());
            for ((n, x), (m, y)) in a.iter().zip(&b) {
                assert_eq!(n, m);
                let (x, y) = (x.as_f32().unwrap(), y.as_f32().unwrap());
                // Non-finite values (the cotangent of a decay state that
                // starts at 0) must be non-finite in both.
                let same_kind = x.iter().zip(y).all(|(p, q)| {
                    p.is_finite() == q.is_finite() && (p.is_finite() || p.is_nan() == q.is_nan())
                });
                assert!(
                    same_kind,
                    "{what}: output '{n}' is finite in one engine only"
                );
                let finite = || x.iter().zip(y).filter(|(_, q)| q.is_finite());
                let scale = finite().fold(1.0f32, |s, (_, q)| s.max(q.abs()));
                let worst = finite().fold(0.0f32, |w, (p, q)| w.max((p - q).abs()));
                assert!(
                    worst <= 1e-4 * scale,
                    "{what}: output '{n}' differs by {worst} (scale {scale})"
                );
            }
        }
    }
}

/// The `objective_chunk` graph, written by columns and fused into
/// column-local kernels (1,100 examples, over a chunk), run by ONNX Runtime
/// with the objective set and its transpose, gives the objective and its
/// gradient of the row-major loss evaluated in f64 at each parameter set.
#[test]
fn objective_by_columns_in_onnx_runtime_matches_the_row_major_loss() {
    use metac_graphs::autodiff::grad;
    use metac_graphs::eval::{eval_graph, Value};
    use std::collections::HashMap;
    let fused = ort(false);
    let mut cfg = config("tiny.toml");
    cfg.objective_examples = 1100;
    cfg.objective_chunk = 2;
    let prog = L2oProgram::from_config(&cfg).unwrap();
    let chunk = prog.objective_chunk_graph();
    let bytes = export_bytes(&chunk, "objective_chunk").unwrap();
    let fused_model = fuse_onnx(&bytes, "objective_chunk").unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&fused_model).contains("cols 1100"),
        "the objective's columns run as column-local kernels"
    );
    let ins = inputs(&prog, &chunk);
    // By columns, the objective reads the set itself on both sides of its
    // products, not a transposed copy.
    assert!(ins.iter().all(|(n, _)| n != "obj.x.T"));
    assert!(prog.layout().objective_transposed.is_empty());
    let refs: Vec<(&str, &HostTensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let got = fused
        .load(&bytes, "objective_chunk")
        .unwrap()
        .run(&refs)
        .unwrap();
    let got: HashMap<String, HostTensor> = got.into_iter().collect();

    // The row-major loss and its gradient, in f64.
    let mut g = Graph::new();
    let names: Vec<String> = prog
        .objective
        .param_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let theta: Vec<_> = prog
        .objective
        .param_shapes()
        .iter()
        .map(|(n, s)| g.input(n, DType::F32, s))
        .collect();
    let xs = g.input("x", DType::F32, &[1100, 784]);
    let ys = g.input("y", DType::I64, &[1100]);
    let loss = prog.objective.loss(&mut g, &theta, &[xs, ys]);
    let grads = grad(&mut g, loss, &theta);
    g.output("loss", loss);
    for (n, d) in names.iter().zip(grads) {
        g.output(&format!("d.{n}"), d);
    }
    let value = |t: &HostTensor| match t {
        HostTensor::F32(a) => Value::F(a.mapv(f64::from)),
        HostTensor::I64(a) => Value::I(a.clone()),
        other => panic!("unexpected input {other:?}"),
    };
    for k in 0..2 {
        let mut vals: HashMap<String, Value> = names
            .iter()
            .map(|n| (n.clone(), value(get_in(&ins, &format!("t{k}.theta.{n}")))))
            .collect();
        vals.insert("x".into(), value(get_in(&ins, "obj.x")));
        vals.insert("y".into(), value(get_in(&ins, "obj.y")));
        let want = eval_graph(&g, &vals).unwrap();
        for (name, w) in want {
            let out = match name.strip_prefix("d.") {
                Some(n) => format!("t{k}.objective_grad.theta.{n}"),
                None => format!("t{k}.objective"),
            };
            let Value::F(w) = w else { panic!("f64 output") };
            let o = got[&out].as_f32().unwrap();
            assert_eq!(o.shape(), w.shape(), "{out}");
            let scale = w.iter().fold(1e-3f64, |s, v| s.max(v.abs()));
            let worst = o
                .iter()
                .zip(w.iter())
                .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{out}: worst {worst} of scale {scale}"
            );
        }
    }
}

fn get_in<'a>(ins: &'a [(String, HostTensor)], name: &str) -> &'a HostTensor {
    &ins.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no input {name}"))
        .1
}

/// The MNIST MLP written row-major only (no `loss_by_columns`), as a
/// problem without a by-columns form is.
struct RowMajor(Box<dyn Problem>);

impl Problem for RowMajor {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.0.param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<metac_contract::init::TensorInit>> {
        self.0.init_rules()
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        self.0.batch_inputs()
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        self.0.loss(g, params, batch)
    }
}

/// The objective set's transposed copy (made by the runtime once per set)
/// is listed in the layout exactly when `objective_chunk` reads it: for a
/// row-major objective whose gradient takes `X^T` (the MLP written
/// row-major), not for one by columns (the MLPs, which read the set on both
/// sides of their products) nor for the ConvNet (whose gradient does not
/// transpose the set).
#[test]
fn the_layout_lists_the_transposed_set_where_the_objective_reads_it() {
    let cases: [(&str, bool, bool); 3] = [
        ("mnist-mlp", false, false),
        ("mnist-mlp", true, true),
        ("mnist-convnet", false, false),
    ];
    for (problem, row_major, reads) in cases {
        let mut cfg = config("tiny.toml");
        cfg.problem = problem.into();
        let mut prog = L2oProgram::from_config(&cfg).unwrap();
        if row_major {
            let mlp = problem_by_name(problem, cfg.objective_examples).unwrap();
            prog.objective = Box::new(RowMajor(mlp));
        }
        let chunk = prog.objective_chunk_graph();
        let reads_transpose = chunk.inputs().iter().any(|(n, _)| n == "obj.x.T");
        assert_eq!(
            reads_transpose, reads,
            "{problem} (row-major {row_major}): graph"
        );
        let want = if reads {
            vec![("obj.x.T".to_string(), "obj.x".to_string())]
        } else {
            vec![]
        };
        assert_eq!(
            prog.layout().objective_transposed,
            want,
            "{problem} (row-major {row_major}): layout"
        );
    }
}

/// Slices read in place by a fused kernel, whose innermost dimension is not
/// contiguous in the tensor they slice (a slice of length 1 along the last
/// axis): the kernel walks them element by element. (The strided views of
/// the importer's pools read wrong elements until this test.)
#[test]
fn fused_views_with_strided_rows_read_the_right_elements() {
    let (fused, plain) = (ort(false), ort(true));
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4, 2]);
    let a = g.slice(x, 3, 0, 1);
    let b = g.slice(x, 3, 1, 2);
    let c = g.slice(x, 2, 1, 2);
    let c = g.reshape(c, &[2, 3, 2, 1]);
    let c = g.slice(c, 2, 0, 1);
    let s = g.add(a, b);
    let s = g.mul(s, c);
    let y = g.exp(s);
    g.output("y", y);
    let bytes = export_bytes(&g, "slices").unwrap();
    assert!(
        fuse_onnx(&bytes, "slices").unwrap().is_some(),
        "nothing was fused"
    );
    let xs = filled(&[2, 3, 4, 2], 3, -1.0, 1.0);
    let at = |n: usize, c: usize, h: usize, w: usize| xs[((n * 3 + c) * 4 + h) * 2 + w];
    let mut want = vec![];
    for n in 0..2 {
        for ch in 0..3 {
            for h in 0..4 {
                want.push(((at(n, ch, h, 0) + at(n, ch, h, 1)) * at(n, ch, 1, 0)).exp());
            }
        }
    }
    let t = HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3, 4, 2]), xs.clone()).unwrap());
    for (which, b) in [("fused", &fused), ("op by op", &plain)] {
        let out = b.load(&bytes, "slices").unwrap().run(&[("x", &t)]).unwrap();
        let got = out[0].1.as_f32().unwrap();
        assert_eq!(got.len(), want.len());
        for (p, q) in got.iter().zip(&want) {
            assert!(
                (p - q).abs() <= 1e-6 * q.abs().max(1.0),
                "{which}: {got:?} vs {want:?}"
            );
        }
    }
}
