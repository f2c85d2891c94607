//! Shared material for metac's integration tests (in `tests/tests/`).

pub mod fixtures;
pub mod op_cases;
pub mod python;
