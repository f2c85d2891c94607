//! Data sets.

pub mod facts;
pub mod mnist;
