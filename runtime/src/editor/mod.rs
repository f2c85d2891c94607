//! The MALMEN editor's host side: the least-squares parameter shift and
//! its adjoint ([`solve`]). The graphs are `metac_compiler::models::editor`'s.

pub mod solve;
