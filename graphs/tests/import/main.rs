//! ONNX import, its tests mirrored on the importer's modules
//! (`src/onnx/import/`): one file per op family, the model level, and the
//! PyTorch fixtures. Bad models give clear errors.

mod common;
mod constants;
mod fixtures;
mod layout;
mod linalg;
mod model;
mod nn;
mod pool;
