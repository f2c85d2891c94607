//! `metac derive`: gradient and HVP graphs of an ONNX model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use metac_compiler::derive::{derive, HvpMode};
use metac_contract::bundle::{BundleBuilder, Port, StateBuffer};

/// Write the gradient and Hessian-vector-product graphs of an ONNX model.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
metac derive mlp.onnx --loss loss --wrt l1.weight,l1.bias,l2.weight,l2.bias --out mlp-derived/\n  \
metac derive model.onnx --loss loss --wrt x --out d/ --hvp-mode rev-rev\n\n\
Writes OUT/grad.onnx (inputs: the model's inputs plus each --wrt initializer, so current parameters \
can be fed; outputs: the loss and grad_<NAME>), OUT/hvp.onnx (the same inputs plus v_<NAME>; outputs \
hvp_<NAME>), OUT/init.safetensors (the initializers' values) and OUT/manifest.json.")]
pub struct Args {
    /// The ONNX model.
    pub model: PathBuf,
    /// Name of the scalar output to differentiate.
    #[arg(long)]
    pub loss: String,
    /// Comma-separated float graph inputs or initializers to differentiate with respect to.
    #[arg(long, value_delimiter = ',', required = true)]
    pub wrt: Vec<String>,
    /// Output directory (a metac bundle).
    #[arg(long)]
    pub out: PathBuf,
    /// How the HVP is built: fwd-rev (forward-over-reverse) or rev-rev (reverse-over-reverse).
    #[arg(long, default_value = "fwd-rev")]
    pub hvp_mode: HvpMode,
}

pub fn run(a: Args) -> Result<()> {
    let model = metac_graphs::onnx::import_file(&a.model)?;
    let d = derive(&model, &a.loss, &a.wrt, a.hvp_mode)
        .with_context(|| a.model.display().to_string())?;
    let mut b = BundleBuilder::new("derive");
    b.meta(serde_json::json!({
        "source": a.model.file_name().map(|f| f.to_string_lossy().to_string()),
        "loss": a.loss,
        "wrt": a.wrt,
        "hvp_mode": format!("{:?}", a.hvp_mode),
    }));
    b.graph("grad", &d.grad)?;
    b.graph("hvp", &d.hvp)?;
    for (name, value) in &model.initializers {
        if a.wrt.contains(name) {
            b.init_tensor(name, value.clone());
            b.state(StateBuffer {
                name: name.clone(),
                dtype: value.dtype().name().into(),
                shape: value.shape.clone(),
                init: Some(name.clone()),
                reads: vec![
                    Port {
                        graph: "grad".into(),
                        tensor: name.clone(),
                    },
                    Port {
                        graph: "hvp".into(),
                        tensor: name.clone(),
                    },
                ],
                updated_by: None,
            });
        }
    }
    let m = b.write(&a.out)?;
    for g in &m.graphs {
        let nodes: usize = g.op_counts.values().sum();
        println!(
            "wrote {} ({} nodes; inputs: {}; outputs: {})",
            a.out.join(&g.file).display(),
            nodes,
            g.inputs
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            g.outputs
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
