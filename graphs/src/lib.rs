//! The metac graph IR: a typed, static-shape graph of a small op set; a
//! builder in which models are plain Rust functions; reverse- and
//! forward-mode autodiff as graph transforms (so derivatives can be
//! differentiated again); optimisation passes; ONNX export and import; and
//! an f64 reference interpreter.

pub mod autodiff;
pub mod cost;
pub mod eval;
pub mod fusion;
pub mod graph;
pub mod onnx;
pub mod ops;
pub mod passes;
pub mod types;

pub use graph::{Graph, GraphError, Node, NodeId};
pub use ops::{BinaryOp, CompareOp, ConvParams, Op, ReduceOp, UnaryOp};
pub use types::{DType, Shape, Tensor, TensorData, TensorType};
