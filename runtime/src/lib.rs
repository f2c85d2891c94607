pub mod backend;
pub mod tensor;
