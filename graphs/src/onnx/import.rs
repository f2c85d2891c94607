//! Import of ONNX inference graphs into the IR.

use std::path::Path;

use crate::graph::Graph;
use crate::types::Tensor;

/// An imported model. Float initializers are the model's parameters: they
/// appear in `graph` as `Input` nodes named like the initializer, and their
/// values are in `initializers`.
#[derive(Debug)]
pub struct ImportedModel {
    pub graph: Graph,
    /// Values of the float initializers (the parameters), in file order.
    pub initializers: Vec<(String, Tensor)>,
    /// The model's own graph inputs (not initializers), in file order.
    pub data_inputs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: not an ONNX model ({reason})")]
    NotOnnx { file: String, reason: String },
    #[error("{file}: unsupported op '{op}' at node '{node}'")]
    UnsupportedOp { file: String, op: String, node: String },
    #[error("{file}: node '{node}' ({op}): {msg}")]
    Invalid { file: String, node: String, op: String, msg: String },
    #[error("{file}: {msg}")]
    Model { file: String, msg: String },
}

pub fn import_bytes(_bytes: &[u8], source: &str) -> Result<ImportedModel, ImportError> {
    Err(ImportError::Model {
        file: source.into(),
        msg: "import not built yet".into(),
    })
}

pub fn import_file(path: &Path) -> Result<ImportedModel, ImportError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImportError::NotOnnx {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    import_bytes(&bytes, &file)
}
