//! The learned-optimizer (L2O) meta-training program: a config
//! ([`config::L2oConfig`]), the graphs of one inner step and its adjoint
//! ([`program::L2oProgram`]), and [`program::compile_l2o`], which writes
//! them as a bundle for the runtime's truncated BPTT
//! (`metac_runtime::l2o::bptt`).

pub mod config;
pub mod program;
pub mod regularizer;

pub use config::L2oConfig;
pub use program::{compile_l2o, L2oProgram};
