//! Models written on the builder as plain Rust functions.

pub mod mlp;
