//! ONNX interchange: export of metac graphs as standard-domain ONNX (opset
//! 17, static shapes, named inputs/outputs, deterministic bytes) and import
//! of common inference ops into the IR.

pub mod export;
pub mod import;

/// The ONNX protobuf types (prost-generated; see the file's header).
#[allow(clippy::all)]
pub mod pb {
    include!("pb.rs");
}

/// The opset every exported graph declares.
pub const OPSET: i64 = 17;
/// The ONNX IR version matching opset 17.
pub const IR_VERSION: i64 = 8;

pub use export::{export_bytes, export_model, externalize_data, ExportError, PROTOBUF_LIMIT};
pub use import::{import_bytes, import_file, inline_external_data, ImportError, ImportedModel};
