pub mod backend;
pub mod bundle;
pub mod data;
pub mod fsutil;
pub mod l2o;
pub mod metatest;
pub mod plot;
pub mod tensor;
