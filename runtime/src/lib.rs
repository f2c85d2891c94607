pub mod backend;
pub mod bundle;
pub mod data;
pub mod fsutil;
pub mod tensor;
