//! The contract between compile and run (`metac-contract`): an L2O bundle
//! carries everything `metac run` needs, its typed metadata round-trips,
//! and the runtime draws from the bundle's init rules exactly the fresh
//! problems the compiler's program draws (and that the code before the
//! rules existed drew: the reference implementations below).

use metac_compiler::l2o::{compile_l2o, L2oConfig, L2oProgram};
use metac_contract::bundle::{Bundle, FORMAT_VERSION, MANIFEST};
use metac_contract::init::{draw_all, SeededRng};
use metac_contract::l2o::{DataKind, L2oMeta, RunSettings};
use metac_graphs::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONFIG: &str = "problem = \"mnist-mlp\"\nbatch_size = 4\nobjective_examples = 8\nuse_second_derivatives = false\nseed = 5\n[run]\nnum_meta_iterations = 2\nunroll_length = 3\nnum_unrolls = 2\n";

fn compiled(dir: &std::path::Path) -> (L2oConfig, Bundle) {
    let c = L2oConfig::from_toml_str(CONFIG).unwrap();
    compile_l2o(&c, dir).unwrap();
    (c, Bundle::load(dir).unwrap())
}

/// The fan-in normal draw as written before init rules: parameter `i`
/// from stream `i`, `N(0,1) * 1.2 / sqrt(fan_in)`, zero biases.
fn reference_fan_in(shapes: &[Vec<usize>], fans: &[usize], seed: u64) -> Vec<Tensor> {
    shapes
        .iter()
        .zip(fans)
        .enumerate()
        .map(|(i, (s, &fan))| {
            let n: usize = s.iter().product();
            if s.len() < 2 {
                return Tensor::f32(s, vec![0.0; n]);
            }
            let mut rng = SeededRng::new(seed, i as u64);
            let scale = 1.2 / (fan as f64).sqrt();
            Tensor::f32(s, (0..n).map(|_| (rng.normal() * scale) as f32).collect())
        })
        .collect()
}

/// The HierarchicalRNN's log learning rates as written before init rules.
fn reference_log_lr(sizes: &[usize], range: (f64, f64), max: f64, seed: u64) -> Vec<f32> {
    let (a, b) = (range.0.ln() / 2.0, range.1.ln() / 2.0);
    let mut vals = vec![];
    for (k, &size) in sizes.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(k as u64);
        let draw = |rng: &mut ChaCha8Rng| if a < b { rng.random_range(a..b) } else { a };
        let offset = draw(&mut rng);
        vals.extend((0..size).map(|_| (draw(&mut rng) + offset).clamp(-33.0, max) as f32));
    }
    vals
}

#[test]
fn the_runtime_draws_the_compilers_fresh_problems_from_the_bundle() {
    let dir = std::env::temp_dir().join(format!("metac-contract-{}", std::process::id()));
    let (c, bundle) = compiled(&dir);
    let meta = L2oMeta::from_manifest(&bundle.manifest).unwrap();
    assert_eq!(meta.problem, "mnist-mlp");
    assert_eq!(meta.data, Some(DataKind::Mnist));
    assert_eq!(
        (meta.seed, meta.batch_size, meta.objective_examples),
        (5, 4, 8)
    );
    let program = L2oProgram::from_config(&c).unwrap();
    assert_eq!(meta.layout, program.layout());
    let shapes = program.param_shapes();
    let hrnn = &program.hrnn.config;
    for seed in [0, 1, 977, u64::MAX] {
        let theta = draw_all(&meta.init.theta, seed);
        assert_eq!(theta, program.init_theta(seed));
        let want = reference_fan_in(&shapes, &[784, 784, 20, 20], seed);
        assert_eq!(theta.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), want);
        let state = draw_all(&meta.init.state, seed);
        assert_eq!(state, program.init_state(seed));
        let log_lr = state
            .iter()
            .find(|(n, _)| n == "hrnn.state.log_lr")
            .expect("the default HRNN has per-element learning rates");
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        assert_eq!(
            log_lr.1.as_f32().unwrap(),
            reference_log_lr(&sizes, hrnn.init_lr_range, hrnn.max_log_lr, seed).as_slice()
        );
        // Everything else starts at zero.
        for (n, t) in state.iter().filter(|(n, _)| n != "hrnn.state.log_lr") {
            assert!(t.as_f32().unwrap().iter().all(|&x| x == 0.0), "{n}");
        }
    }
    // The typed record is what the manifest holds, and round-trips.
    assert_eq!(meta.to_meta(), bundle.manifest.meta);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bundles_of_another_format_or_with_bad_metadata_are_refused() {
    let dir = std::env::temp_dir().join(format!("metac-contract-bad-{}", std::process::id()));
    compiled(&dir);
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    // A version-1 bundle (before typed metadata and init rules).
    m["format_version"] = serde_json::json!(1);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    let e = format!("{:#}", Bundle::load(&dir).err().unwrap());
    assert!(
        e.contains("format version 1") && e.contains(&FORMAT_VERSION.to_string()),
        "{e}"
    );
    assert!(e.contains("recompile"), "{e}");
    // Init rules that disagree with the layout are named.
    m["format_version"] = serde_json::json!(FORMAT_VERSION);
    m["meta"]["l2o"]["init"]["theta"][0]["name"] = serde_json::json!("theta.nope");
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    let b = Bundle::load(&dir).unwrap();
    let e = format!("{:#}", L2oMeta::from_manifest(&b.manifest).unwrap_err());
    assert!(
        e.contains("l2o.init.theta") && e.contains("theta.nope"),
        "{e}"
    );
    // A segment list that does not cover its tensor.
    m["meta"]["l2o"]["init"]["theta"][0]["name"] = serde_json::json!("theta.w0");
    let state = m["meta"]["l2o"]["init"]["state"].as_array_mut().unwrap();
    let lr = state
        .iter_mut()
        .find(|s| s["rule"] == "segmented-uniform")
        .unwrap();
    lr["segments"][0] = serde_json::json!(1);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    let b = Bundle::load(&dir).unwrap();
    let e = format!("{:#}", L2oMeta::from_manifest(&b.manifest).unwrap_err());
    assert!(
        e.contains("segments") && e.contains("hrnn.state.log_lr"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_run_table_is_one_type_for_compiler_and_runtime() {
    let c = L2oConfig::from_toml_str(CONFIG).unwrap();
    assert_eq!(c.run, RunSettings::from_config_str(CONFIG).unwrap());
    assert_eq!(c.run.num_unrolls, 2);
}

/// A graph past the builder's size limit keeps its large tensors in
/// `<name>.onnx.data` (ONNX external data, as protobuf's 2 GiB limit
/// requires of large derived graphs): the bundle opens and runs the same as
/// inline, ONNX Runtime's Python API loads it from its file, and a changed
/// data file is refused.
#[test]
fn large_graphs_are_written_with_external_data() {
    use metac_contract::bundle::BundleBuilder;
    use metac_graphs::{DType, Graph};
    use metac_runtime::backend::{open_backend, BackendChoice, BackendOptions};
    use metac_runtime::tensor::HostTensor;
    use metac_tests::python::{run_script, scratch};

    let (rows, n) = (3, 128);
    let w: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[rows, n]);
    let wc = g.constant(Tensor::f32(&[n, n], w.clone()));
    let y = g.matmul(x, wc);
    let y = g.tanh(y);
    g.output("y", y);
    let (ext, inline) = (scratch("external-data"), scratch("inline-data"));
    BundleBuilder::new("test")
        .external_data_above(16 * 1024)
        .graph("g", &g)
        .unwrap()
        .write(&ext)
        .unwrap();
    BundleBuilder::new("test")
        .graph("g", &g)
        .unwrap()
        .write(&inline)
        .unwrap();
    let model = std::fs::metadata(ext.join("g.onnx")).unwrap().len();
    let data = std::fs::metadata(ext.join("g.onnx.data")).unwrap().len();
    assert!(model < 4096 && data >= (n * n * 4) as u64, "{model} {data}");
    assert!(!inline.join("g.onnx.data").exists());

    let xs: Vec<f32> = (0..rows * n)
        .map(|i| i as f32 / (rows * n) as f32)
        .collect();
    let feed = HostTensor::F32(ndarray::ArrayD::from_shape_vec(vec![rows, n], xs).unwrap());
    let ort = open_backend(&BackendOptions {
        choice: BackendChoice::Ort,
        ..Default::default()
    })
    .unwrap();
    let run = |dir: &std::path::Path| -> Vec<f32> {
        let b = Bundle::load(dir).unwrap();
        let mut s = ort.load(&b.graph_bytes("g").unwrap(), "g").unwrap();
        let o = s.run(&[("x", &feed)]).unwrap();
        o[0].1.as_f32().unwrap().iter().copied().collect()
    };
    let (a, b) = (run(&ext), run(&inline));
    assert_eq!(a, b);
    let out = run_script(
        "run_external.py",
        &[
            &ext.join("g.onnx"),
            std::path::Path::new(&rows.to_string()),
            std::path::Path::new(&n.to_string()),
        ],
    );
    let py: Vec<f32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(py.len(), a.len());
    for (p, q) in py.iter().zip(&a) {
        assert!((p - q).abs() <= 1e-6, "{p} vs {q}");
    }
    // A changed data file is refused, naming it.
    let mut bytes = std::fs::read(ext.join("g.onnx.data")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(ext.join("g.onnx.data"), bytes).unwrap();
    let Err(e) = Bundle::load(&ext) else {
        panic!("a changed data file was accepted")
    };
    assert!(format!("{e:#}").contains("g.onnx.data"), "{e:#}");
}
