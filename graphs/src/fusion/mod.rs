//! Elementwise fusion: chains of elementwise ops over tensors of one shape,
//! and column-local computations over `[k, N]` tensors (see [`cluster`]),
//! become one kernel that reads its inputs and writes its outputs once.
//!
//! The HierarchicalRNN's step and its VJP are hundreds of small elementwise
//! ops over `[k, N]` tensors (N = the optimizee's parameter count). An engine
//! that runs each as its own pass over memory spends its time moving data;
//! fused, a chain costs one pass. [`cluster`] finds the chains on the IR,
//! [`program`] is the register program each compiles to (its instructions
//! and text form; the runtime's `backend::fused` runs it), and
//! [`fuse_onnx`] writes them, through the exporter's custom-node hook
//! (`onnx::export::export_with_custom_nodes`), as `ai.metac`
//! `FusedElementwise` nodes for the runtime's ONNX Runtime custom kernel.
//! Before clustering, [`split_products`] splits products of row-stacked
//! concatenations so that the concatenations can stay inside a cluster, and
//! [`contraction_forms`] writes per-tensor sums and sums over columns as
//! products that clusters compute as contractions (`Instr::Contract`).
//! Bundles stay standard ONNX: fusion happens when a backend loads a graph.

pub mod cluster;
pub mod contraction_forms;
pub mod program;
pub mod split_products;

pub use cluster::{find_clusters, Cluster};
pub use program::{FusedProgram, FUSED_DOMAIN, FUSED_OP};

use crate::onnx::export::{export_with_custom_nodes, CustomNode};
use crate::onnx::import::{import_bytes, ImportError};
use crate::onnx::pb::{attribute_proto::AttributeType, AttributeProto};

/// An ONNX model with its elementwise chains fused, or `None` when nothing
/// fuses. The model is read with metac's importer (its float initializers
/// become constants again), so it must use ops the importer knows.
pub fn fuse_onnx(bytes: &[u8], source: &str) -> Result<Option<Vec<u8>>, ImportError> {
    use prost::Message;
    let imported = import_bytes(bytes, source)?;
    let mut g = imported.graph;
    for (name, value) in imported.initializers {
        if let Some(id) = g.find_input(&name) {
            g.freeze_input(id, value)
                .map_err(|msg| ImportError::Model {
                    file: source.into(),
                    msg: format!("initializer '{name}': {msg}"),
                })?;
        }
    }
    let g = split_products::split_row_stacked_products(&g);
    let g = contraction_forms::contraction_forms(&g);
    let clusters = find_clusters(&g);
    if clusters.is_empty() {
        return Ok(None);
    }
    let name = import_graph_name(bytes).unwrap_or_else(|| "fused".into());
    let custom: Vec<CustomNode> = clusters.iter().map(custom_node).collect();
    let model = export_with_custom_nodes(&g, &name, &custom).map_err(|e| ImportError::Model {
        file: source.into(),
        msg: format!("re-export after fusion: {e}"),
    })?;
    Ok(Some(model.encode_to_vec()))
}

/// A cluster as one `ai.metac` `FusedElementwise` node, its program in the
/// string attribute `program`.
fn custom_node(c: &Cluster) -> CustomNode {
    CustomNode {
        members: c.members.clone(),
        inputs: c.inputs.clone(),
        outputs: c.outputs.clone(),
        domain: FUSED_DOMAIN.into(),
        op_type: FUSED_OP.into(),
        attributes: vec![AttributeProto {
            name: "program".into(),
            r#type: AttributeType::String as i32,
            s: c.program.encode().into_bytes(),
            ..Default::default()
        }],
    }
}

fn import_graph_name(bytes: &[u8]) -> Option<String> {
    use prost::Message;
    let m = crate::onnx::pb::ModelProto::decode(bytes).ok()?;
    m.graph.map(|g| g.name)
}
