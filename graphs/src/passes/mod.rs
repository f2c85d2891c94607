//! Graph passes. `optimize` runs them all: one forward rebuild that
//! simplifies the zeros and ones autodiff produces, folds constants and
//! shares common subexpressions, followed by dead-code elimination.

pub mod dce;
pub mod merge_matmuls;
mod rebuild;
mod simplify;

pub use dce::dce;
pub use merge_matmuls::merge_shared_lhs_matmuls;
pub use rebuild::{cse_fold_simplify, RebuildOptions};

use crate::graph::Graph;

/// The standard pipeline, run before export.
pub fn optimize(g: &Graph) -> Graph {
    let g = cse_fold_simplify(g, &RebuildOptions::default());
    dce(&g)
}
