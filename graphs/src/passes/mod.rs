//! Graph passes. `optimize` runs them all: one forward rebuild that
//! simplifies the zeros and ones autodiff produces, folds constants and
//! shares common subexpressions, followed by dead-code elimination.

pub mod column_sums;
pub mod dce;
pub mod merge_matmuls;
mod rebuild;
mod simplify;

pub use column_sums::column_sums_as_products;
pub use dce::dce;
pub use merge_matmuls::merge_shared_lhs_matmuls;
pub use rebuild::{cse_fold_simplify, RebuildOptions};

use crate::graph::Graph;

/// The standard pipeline, run before export.
pub fn optimize(g: &Graph) -> Graph {
    let g = cse_fold_simplify(g, &RebuildOptions::default());
    dce(&g)
}

/// Test inputs: `sin(i * k)` at flat index `i`.
#[cfg(test)]
pub(crate) fn sine_values(shape: &[usize], k: f64) -> crate::eval::Value {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| (i as f64 * k).sin()).collect();
    crate::eval::Value::F(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), data).expect("shape and data agree"),
    )
}
