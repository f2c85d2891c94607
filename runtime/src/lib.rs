pub mod backend;
pub mod tensor;
pub mod bundle;
pub mod fsutil;
pub mod data;
