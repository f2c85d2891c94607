//! `metac inspect`: what a bundle or an ONNX model contains.

use std::path::PathBuf;

use anyhow::{Context, Result};
use metac_contract::bundle::{op_counts, Bundle, TensorSpec};
use metac_graphs::onnx::pb;
use prost::Message;

/// Print graphs, inputs/outputs with shapes, op counts and parameter counts.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  metac inspect derived/          # a bundle directory\n  metac inspect model.onnx        # any ONNX model"
)]
pub struct Args {
    /// A bundle directory or an .onnx file.
    pub path: PathBuf,
}

fn fmt_spec(t: &TensorSpec) -> String {
    format!("{:<28} {:<5} {:?}", t.name, t.dtype, t.shape)
}

fn fmt_ops(c: &std::collections::BTreeMap<String, usize>) -> String {
    c.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(a: Args) -> Result<()> {
    if a.path.is_dir() {
        let b = Bundle::load(&a.path)?;
        let m = &b.manifest;
        println!(
            "bundle {} (kind {}, metac {}, opset {})",
            a.path.display(),
            m.kind,
            m.metac_version,
            m.onnx_opset
        );
        for g in &m.graphs {
            let n: usize = g.op_counts.values().sum();
            println!("\ngraph {} ({}; {} nodes)", g.name, g.file, n);
            println!("  inputs:");
            for t in &g.inputs {
                println!("    {}", fmt_spec(t));
            }
            println!("  outputs:");
            for t in &g.outputs {
                println!("    {}", fmt_spec(t));
            }
            println!("  ops: {}", fmt_ops(&g.op_counts));
        }
        if !m.state.is_empty() {
            let total: usize = m
                .state
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            println!(
                "\nstate buffers ({} tensors, {} numbers):",
                m.state.len(),
                total
            );
            for s in &m.state {
                let upd = s
                    .updated_by
                    .as_ref()
                    .map(|p| format!(" <- {}.{}", p.graph, p.tensor))
                    .unwrap_or_default();
                println!("  {:<28} {:<5} {:?}{}", s.name, s.dtype, s.shape, upd);
            }
        }
        return Ok(());
    }
    let bytes =
        std::fs::read(&a.path).with_context(|| format!("cannot read {}", a.path.display()))?;
    let m = pb::ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("{}: not an ONNX model", a.path.display()))?;
    let g = m
        .graph
        .as_ref()
        .with_context(|| format!("{}: ONNX model has no graph", a.path.display()))?;
    let opsets: Vec<String> = m
        .opset_import
        .iter()
        .map(|o| {
            format!(
                "{}:{}",
                if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                },
                o.version
            )
        })
        .collect();
    println!(
        "model {} (ir {}, opsets {}, producer {} {})",
        a.path.display(),
        m.ir_version,
        opsets.join(" "),
        m.producer_name,
        m.producer_version
    );
    let init_names: std::collections::BTreeSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    println!("  inputs:");
    for v in g
        .input
        .iter()
        .filter(|v| !init_names.contains(v.name.as_str()))
    {
        println!("    {}", describe(v));
    }
    println!("  outputs:");
    for v in &g.output {
        println!("    {}", describe(v));
    }
    let mut params = 0usize;
    println!("  initializers ({}):", g.initializer.len());
    for t in &g.initializer {
        let n: i64 = t.dims.iter().product();
        if t.data_type == 1 {
            params += n as usize;
        }
        println!(
            "    {:<28} {:<5} {:?}",
            t.name,
            dtype_name(t.data_type),
            t.dims
        );
    }
    println!("  parameters (float initializers): {params}");
    println!(
        "  ops ({} nodes): {}",
        g.node.len(),
        fmt_ops(&op_counts(&m))
    );
    Ok(())
}

fn dtype_name(t: i32) -> &'static str {
    match t {
        1 => "f32",
        7 => "i64",
        9 => "bool",
        6 => "i32",
        10 => "f16",
        11 => "f64",
        _ => "other",
    }
}

fn describe(v: &pb::ValueInfoProto) -> String {
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => {
            let dims: Vec<String> = t
                .shape
                .iter()
                .flat_map(|s| &s.dim)
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(x)) => x.to_string(),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect();
            format!(
                "{:<28} {:<5} [{}]",
                v.name,
                dtype_name(t.elem_type),
                dims.join(", ")
            )
        }
        _ => format!("{:<28} (non-tensor)", v.name),
    }
}
