pub mod backend;
pub mod data;
pub mod hessian;
pub mod l2o;
pub mod metatest;
pub mod plot;
pub mod rng;
pub mod tensor;
