//! Models written on the builder as plain Rust functions.

pub mod baselines;
pub mod convnet;
pub mod editor;
pub mod hrnn;
pub mod lm;
pub mod mlp;
pub mod moe;
pub mod problems;
pub mod synthetic;
pub mod transformer;
