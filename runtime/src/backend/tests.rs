//! Backend tests. The ONNX model is built in Rust with the ONNX protobuf types so the tests need no Python
//! and no checked-in binaries.

use std::process::Command;
use std::str::FromStr;

use metac_graphs::onnx::pb::{
    tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use ndarray::{arr1, arr2, ArrayD, IxDyn};
use prost::Message;

use super::*;

fn value_info(name: &str, dt: DataType, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dt as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

fn i64_init(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outputs[0]),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

const TABLE: [f32; 12] = [
    0.1, -0.2, 0.3, 0.4, 0.5, -0.6, -0.7, 0.8, 0.9, 1.0, -1.1, 1.2,
];
const W: [f32; 6] = [0.5, -1.0, 1.5, 0.25, -0.75, 2.0];
const B: [f32; 2] = [0.1, -0.3];

/// Inputs: x f32[2,3], idx i64[2], m bool[2,2].
/// Outputs (in this order): y = Sigmoid((x + Gather(T, idx)) @ W + B) f32[2,2]; masked = Where(m, y, 0);
/// gt = y > 0.5 (bool); idx_plus = idx + 1 (i64).
fn tiny_model() -> Vec<u8> {
    let axis = AttributeProto {
        name: "axis".into(),
        r#type: 2,
        i: 0,
        ..Default::default()
    };
    let graph = GraphProto {
        name: "tiny".into(),
        node: vec![
            node("Gather", &["T", "idx"], &["e"], vec![axis]),
            node("Add", &["x", "e"], &["h"], vec![]),
            node("MatMul", &["h", "W"], &["z0"], vec![]),
            node("Add", &["z0", "B"], &["z"], vec![]),
            node("Sigmoid", &["z"], &["y"], vec![]),
            node("Where", &["m", "y", "zero"], &["masked"], vec![]),
            node("Greater", &["y", "half"], &["gt"], vec![]),
            node("Add", &["idx", "one"], &["idx_plus"], vec![]),
        ],
        initializer: vec![
            f32_init("T", &[4, 3], &TABLE),
            f32_init("W", &[3, 2], &W),
            f32_init("B", &[2], &B),
            f32_init("zero", &[], &[0.0]),
            f32_init("half", &[], &[0.5]),
            i64_init("one", &[], &[1]),
        ],
        input: vec![
            value_info("x", DataType::Float, &[2, 3]),
            value_info("idx", DataType::Int64, &[2]),
            value_info("m", DataType::Bool, &[2, 2]),
        ],
        output: vec![
            value_info("y", DataType::Float, &[2, 2]),
            value_info("masked", DataType::Float, &[2, 2]),
            value_info("gt", DataType::Bool, &[2, 2]),
            value_info("idx_plus", DataType::Int64, &[2]),
        ],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "metac-tests".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn sample_inputs() -> (HostTensor, HostTensor, HostTensor) {
    let x = HostTensor::from(arr2(&[[1.0f32, -2.0, 0.5], [0.25, 0.75, -1.5]]).into_dyn());
    let idx = HostTensor::from(arr1(&[3i64, 1]).into_dyn());
    let m = HostTensor::from(arr2(&[[true, false], [false, true]]).into_dyn());
    (x, idx, m)
}

/// The same computation in plain Rust, as ground truth for both backends.
fn expected_y() -> ArrayD<f32> {
    let x = [[1.0f32, -2.0, 0.5], [0.25, 0.75, -1.5]];
    let idx = [3usize, 1];
    let mut y = ArrayD::<f32>::zeros(IxDyn(&[2, 2]));
    for i in 0..2 {
        for j in 0..2 {
            let mut acc = B[j];
            for k in 0..3 {
                acc += (x[i][k] + TABLE[idx[i] * 3 + k]) * W[k * 2 + j];
            }
            y[[i, j]] = 1.0 / (1.0 + (-acc).exp());
        }
    }
    y
}

fn tract() -> Box<dyn Backend> {
    open_backend(&BackendOptions {
        choice: BackendChoice::Tract,
        ..Default::default()
    })
    .unwrap()
}

/// ONNX Runtime, which the project's test command installs
/// (`pip install -r requirements.txt`): a test that needs it fails, naming
/// why, where it cannot be loaded, rather than passing without checking.
fn ort_required(test: &str) -> Box<dyn Backend> {
    open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        threads: Some(1),
        ..Default::default()
    })
    .unwrap_or_else(|e| {
        panic!("{test} needs ONNX Runtime (pip install -r requirements.txt): {e:#}")
    })
}

fn run_all(s: &mut dyn Session, order: &[usize]) -> Vec<(String, HostTensor)> {
    let (x, idx, m) = sample_inputs();
    let all: [(&str, &HostTensor); 3] = [("x", &x), ("idx", &idx), ("m", &m)];
    let given: Vec<(&str, &HostTensor)> = order.iter().map(|&i| all[i]).collect();
    s.run(&given).unwrap()
}

/// The same values in column-major memory: a valid array that is not in standard layout.
fn fortran_order(t: &HostTensor) -> HostTensor {
    use ndarray::ShapeBuilder;
    let a = t.as_f32().unwrap();
    let mut f = ArrayD::<f32>::zeros(IxDyn(a.shape()).f());
    f.assign(a);
    assert!(!f.is_standard_layout());
    HostTensor::from(f)
}

fn assert_close(a: &ArrayD<f32>, b: &ArrayD<f32>, rel: f32) {
    assert_eq!(a.shape(), b.shape());
    for (x, y) in a.iter().zip(b.iter()) {
        let tol = rel * x.abs().max(y.abs()).max(1e-6);
        assert!(
            (x - y).abs() <= tol,
            "{x} vs {y} (rel tol {rel})\n{a:?}\n{b:?}"
        );
    }
}

fn check_outputs(out: &[(String, HostTensor)]) {
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["y", "masked", "gt", "idx_plus"]);
    let y = out[0].1.as_f32().unwrap();
    assert_close(y, &expected_y(), 1e-5);
    let masked = out[1].1.as_f32().unwrap();
    assert_eq!(masked[[0, 1]], 0.0);
    assert_eq!(masked[[1, 0]], 0.0);
    assert_eq!(masked[[0, 0]], y[[0, 0]]);
    let gt = out[2].1.as_bool().unwrap();
    for (g, v) in gt.iter().zip(y.iter()) {
        assert_eq!(*g, *v > 0.5);
    }
    assert_eq!(out[3].1.as_i64().unwrap().as_slice().unwrap(), &[4, 2]);
}

fn check_backend(b: &dyn Backend) {
    let mut s = b.load(&tiny_model(), "tiny").unwrap();
    assert_eq!(s.input_names(), ["x", "idx", "m"]);
    assert_eq!(s.output_names(), ["y", "masked", "gt", "idx_plus"]);
    let first = run_all(s.as_mut(), &[0, 1, 2]);
    check_outputs(&first);
    // Any input order gives the same answer, and repeated runs on one session are stable.
    for order in [[2, 0, 1], [1, 2, 0], [0, 1, 2]] {
        assert_eq!(run_all(s.as_mut(), &order), first);
    }
}

fn check_input_errors(b: &dyn Backend) {
    let mut s = b.load(&tiny_model(), "tiny").unwrap();
    let (x, idx, m) = sample_inputs();

    let err = s.run(&[("x", &x), ("m", &m)]).unwrap_err().to_string();
    assert!(
        err.contains("missing input") && err.contains("'idx'") && err.contains("tiny"),
        "{err}"
    );

    let wrong = HostTensor::from(arr1(&[3.0f32, 1.0]).into_dyn());
    let err = s
        .run(&[("x", &x), ("idx", &wrong), ("m", &m)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'idx'") && err.contains("expects i64") && err.contains("got f32"),
        "{err}"
    );

    let bad_shape = HostTensor::from(ArrayD::<f32>::zeros(IxDyn(&[3, 2])));
    let err = s
        .run(&[("x", &bad_shape), ("idx", &idx), ("m", &m)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'x'") && err.contains("[2, 3]") && err.contains("[3, 2]"),
        "{err}"
    );

    let err = s
        .run(&[("x", &x), ("idx", &idx), ("m", &m), ("extra", &m)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown input") && err.contains("'extra'"),
        "{err}"
    );

    let err = s
        .run(&[("x", &x), ("x", &x), ("idx", &idx), ("m", &m)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than once"), "{err}");

    // The session is still usable after rejected calls.
    check_outputs(&s.run(&[("m", &m), ("x", &x), ("idx", &idx)]).unwrap());
}

#[test]
fn tract_runs_tiny_model() {
    let b = tract();
    assert_eq!(b.name(), "tract");
    check_backend(b.as_ref());
}

#[test]
fn tract_input_errors() {
    check_input_errors(tract().as_ref());
}

#[test]
fn tract_accepts_non_contiguous_inputs() {
    let b = tract();
    let mut s = b.load(&tiny_model(), "tiny").unwrap();
    let (x, idx, m) = sample_inputs();
    let xt = fortran_order(&x);
    assert_eq!(
        s.run(&[("x", &xt), ("idx", &idx), ("m", &m)]).unwrap(),
        run_all(s.as_mut(), &[0, 1, 2])
    );
}

#[test]
fn ort_runs_tiny_model() {
    let b = ort_required("ort_runs_tiny_model");
    assert_eq!(b.name(), "ort");
    check_backend(b.as_ref());
}

#[test]
fn ort_input_errors() {
    let b = ort_required("ort_input_errors");
    check_input_errors(b.as_ref());
}

#[test]
fn ort_and_tract_agree() {
    let ort = ort_required("ort_and_tract_agree");
    let model = tiny_model();
    let a = run_all(ort.load(&model, "tiny").unwrap().as_mut(), &[0, 1, 2]);
    let b = run_all(tract().load(&model, "tiny").unwrap().as_mut(), &[2, 1, 0]);
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        match (ta, tb) {
            (HostTensor::F32(x), HostTensor::F32(y)) => assert_close(x, y, 1e-5),
            _ => assert_eq!(ta, tb),
        }
    }
}

#[test]
fn ort_accepts_non_contiguous_inputs() {
    let b = ort_required("ort_accepts_non_contiguous_inputs");
    let mut s = b.load(&tiny_model(), "tiny").unwrap();
    let (x, idx, m) = sample_inputs();
    let xt = fortran_order(&x);
    assert_eq!(
        s.run(&[("x", &xt), ("idx", &idx), ("m", &m)]).unwrap(),
        run_all(s.as_mut(), &[0, 1, 2])
    );
}

#[test]
fn auto_picks_ort_when_available_and_repeated_opens_are_fine() {
    ort_required("auto_picks_ort_when_available");
    for _ in 0..3 {
        let b = open_backend(&BackendOptions::default()).unwrap();
        assert_eq!(b.name(), "ort");
    }
    let rt = discovery::ort_runtime().unwrap();
    assert!(rt.version.starts_with("1."), "{}", rt.version);
}

#[test]
fn cuda_with_ort_is_an_error_not_a_panic() {
    ort_required("cuda_with_ort_is_an_error_not_a_panic");
    let opts = BackendOptions {
        choice: BackendChoice::Ort,
        device: Device::Cuda(0),
        threads: None,
        unfused: false,
    };
    // Either opening or loading must fail on a machine without a usable CUDA provider; on a real GPU
    // machine with onnxruntime-gpu both succeed, which is also fine.
    let result = std::panic::catch_unwind(|| {
        open_backend(&opts).and_then(|b| b.load(&tiny_model(), "tiny").map(|_| ()))
    });
    let result = result.expect("CUDA request must not panic");
    if let Err(e) = result {
        let msg = format!("{e:#}");
        eprintln!("cuda:0 with ORT -> {msg}");
        assert!(msg.contains("CUDA execution provider unavailable"), "{msg}");
    }
}

#[test]
fn cuda_registration_failure_is_an_error_not_a_cpu_fallback() {
    // Bypasses the up-front availability check to exercise ort's `error_on_failure` path directly.
    ort_required("cuda_registration_failure_is_an_error_not_a_cpu_fallback");
    let rt = discovery::ort_runtime().unwrap();
    let builder = ort::session::Session::builder(&rt.env).unwrap();
    match ort_backend::register_cuda(builder, 0) {
        Ok(_) => {
            eprintln!("CUDA execution provider registered: this ONNX Runtime has CUDA support")
        }
        Err(e) => {
            eprintln!("register_cuda -> {e:#}");
            assert!(
                e.to_string()
                    .starts_with("CUDA execution provider unavailable: "),
                "{e:#}"
            );
        }
    }
}

#[test]
fn cuda_with_tract_is_an_error() {
    let opts = BackendOptions {
        choice: BackendChoice::Tract,
        device: Device::Cuda(0),
        threads: None,
        unfused: false,
    };
    let err = open_backend(&opts).err().expect("tract + cuda must fail");
    assert!(err.to_string().contains("tract runs on CPU only"), "{err}");
}

#[test]
fn parse_choice_and_device() {
    assert_eq!(
        BackendChoice::from_str("auto").unwrap(),
        BackendChoice::Auto
    );
    assert_eq!(BackendChoice::from_str("ORT").unwrap(), BackendChoice::Ort);
    assert_eq!(
        BackendChoice::from_str("tract").unwrap(),
        BackendChoice::Tract
    );
    let err = BackendChoice::from_str("foo").unwrap_err().to_string();
    assert!(
        err.contains("foo") && err.contains("auto, ort, tract"),
        "{err}"
    );

    assert_eq!(Device::from_str("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::from_str("cuda:3").unwrap(), Device::Cuda(3));
    assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    for bad in ["cuda:x", "cuda", "cuda:-1", "gpu", ""] {
        let err = Device::from_str(bad).unwrap_err().to_string();
        assert!(err.contains("invalid device"), "{bad}: {err}");
    }
}

#[test]
fn garbage_bytes_are_an_error() {
    let err = tract().load(b"definitely not onnx", "junk").err().unwrap();
    assert!(format!("{err:#}").contains("junk"), "{err:#}");
    let b = ort_required("garbage_bytes_are_an_error");
    let err = b.load(b"definitely not onnx", "junk").err().unwrap();
    assert!(format!("{err:#}").contains("junk"), "{err:#}");
}

/// Environment variable that turns [`child_open_backend`] on inside a re-executed test binary.
const CHILD_ENV: &str = "METAC_BACKEND_TEST_CHILD";

/// Runs `child_open_backend` in a fresh process (ort's library and environment are per-process, and env
/// vars are process-global, so this is the only faithful way to test discovery end to end).
fn run_child(mode: &str, ort_dylib_path: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "backend::tests::child_open_backend",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env("ORT_DYLIB_PATH", ort_dylib_path)
        .output()
        .unwrap()
}

#[test]
#[ignore = "helper: only meaningful when re-executed by run_child"]
fn child_open_backend() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    match mode.as_str() {
        "ort" => {
            let err = open_backend(&BackendOptions {
                choice: BackendChoice::Ort,
                ..Default::default()
            })
            .err()
            .expect("Ort choice with a bad ORT_DYLIB_PATH must fail");
            println!("CHILD-ERR: {err:#}");
        }
        "auto" => {
            for _ in 0..2 {
                let b = open_backend(&BackendOptions::default()).unwrap();
                assert_eq!(b.name(), "tract");
            }
            let cuda = open_backend(&BackendOptions {
                device: Device::Cuda(0),
                ..Default::default()
            });
            println!(
                "CHILD-CUDA-ERR: {:#}",
                cuda.err().expect("auto + cuda without ORT must fail")
            );
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// The text after `tag` on the child's stdout (libtest prints "test name ... " before it on the same line).
fn child_line<'s>(stdout: &'s str, tag: &str) -> &'s str {
    let line = stdout
        .lines()
        .find(|l| l.contains(tag))
        .unwrap_or_else(|| panic!("child printed no {tag:?}:\n{stdout}"));
    &line[line.find(tag).unwrap() + tag.len()..]
}

#[test]
fn ort_dylib_path_missing_is_an_error_for_ort_choice() {
    let out = run_child("ort", "/nonexistent/libonnxruntime.so");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = child_line(&stdout, "CHILD-ERR: ");
    assert!(
        line.contains("/nonexistent/libonnxruntime.so") && line.contains("pip install onnxruntime"),
        "{line}"
    );

    // A file that exists but is not ONNX Runtime: still an Err, never a panic or abort.
    let exe = std::env::current_exe().unwrap();
    let out = run_child("ort", exe.to_str().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = child_line(&stdout, "CHILD-ERR: ");
    assert!(line.contains("could not load"), "{line}");
}

#[test]
fn ort_dylib_path_missing_makes_auto_fall_back_with_one_line() {
    let out = run_child("auto", "/nonexistent/libonnxruntime.so");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let notices: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("falling back to tract"))
        .collect();
    assert_eq!(
        notices.len(),
        1,
        "expected exactly one fallback line, got:\n{stderr}"
    );
    assert!(
        notices[0].starts_with("metac: ONNX Runtime not available (")
            && notices[0].contains("ORT_DYLIB_PATH")
    );
    let cuda = child_line(&stdout, "CHILD-CUDA-ERR: ");
    assert!(
        cuda.contains("cuda:0") && cuda.contains("onnxruntime-gpu"),
        "{cuda}"
    );
}

/// A model metac's importer cannot read (here: `Hardmax`, next to a chain
/// that would fuse) still loads in ONNX Runtime with fusion on, and runs op
/// by op.
#[test]
fn ort_runs_a_model_the_fusion_cannot_read() {
    let b = ort_required("ort_runs_a_model_the_fusion_cannot_read");
    let graph = GraphProto {
        name: "hardmax".into(),
        node: vec![
            node("Sigmoid", &["x"], &["s"], vec![]),
            node("Mul", &["s", "x"], &["t"], vec![]),
            node("Hardmax", &["t"], &["y"], vec![]),
        ],
        input: vec![value_info("x", DataType::Float, &[2, 3])],
        output: vec![value_info("y", DataType::Float, &[2, 3])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec();
    let mut s = b.load(&model, "hardmax").unwrap();
    let x = HostTensor::from(
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.5, 2.0, -1.0, -3.0, -0.5, 1.0]).unwrap(),
    );
    let out = s.run(&[("x", &x)]).unwrap();
    let y = out[0].1.as_f32().unwrap();
    // x * sigmoid(x) is largest at 2.0 in the first row and 1.0 in the second.
    assert_eq!(
        y.iter().copied().collect::<Vec<_>>(),
        [0., 1., 0., 0., 0., 1.]
    );
}
