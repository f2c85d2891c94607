//! A graph past protobuf's 2 GiB limit, written as a bundle: its weight
//! goes to ONNX external data (`g.onnx.data`). Evidence for docs/derive.md
//! ("Large graphs"); about 9 GB of memory and 2.2 GB of disk.
//!
//!     cargo run --release -p metac --example external_data -- OUT_DIR
//!     python3 -c "import onnxruntime as o, numpy as np; s = o.InferenceSession('OUT_DIR/g.onnx'); \
//!         print(s.run(None, {'x': np.ones((1, 23240), np.float32)})[0][0, :4])"
//!
//! `y = x @ W` with `W[i, j] = ((i + 2 j) % 7) / 1000`, so with `x = 1`
//! every `y[j]` is an exact sum the example prints for comparison.

use anyhow::Result;
use metac_contract::bundle::{Bundle, BundleBuilder};
use metac_graphs::{DType, Graph, Tensor};

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: external_data OUT_DIR"))?;
    let n = 23_240; // 540 M floats: 2.16 GB
    let w: Vec<f32> = (0..n * n)
        .map(|k| (((k / n) + 2 * (k % n)) % 7) as f32 / 1000.0)
        .collect();
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[1, n]);
    let wc = g.constant(Tensor::f32(&[n, n], w));
    let y = g.matmul(x, wc);
    g.output("y", y);
    let dir = std::path::Path::new(&out);
    BundleBuilder::new("test").graph("g", &g)?.write(dir)?;
    for f in ["g.onnx", "g.onnx.data"] {
        println!("{f}: {} bytes", std::fs::metadata(dir.join(f))?.len());
    }
    let b = Bundle::load(dir)?;
    println!("manifest data entry: {:?}", b.manifest.graphs[0].data);
    match b.graph_bytes("g") {
        Ok(bytes) => println!("inlined: {} bytes", bytes.len()),
        Err(e) => println!("metac's loader: {e:#}"),
    }
    let want: Vec<f64> = (0..4)
        .map(|j| (0..n).map(|i| ((i + 2 * j) % 7) as f64 / 1000.0).sum())
        .collect();
    println!("expected y[0, :4] = {want:?}");
    Ok(())
}
