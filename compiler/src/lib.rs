//! metac compiler: models written on the graph builder, and the programs
//! that turn them into bundles or derived graphs.

pub mod derive;
pub mod editor;
pub mod hessian;
pub mod l2o;
pub mod lm;
pub mod metatest;
pub mod models;
pub mod moe;
