//! Data sets.

pub mod edits;
pub mod facts;
pub mod mnist;
pub mod text;
