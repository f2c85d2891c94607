//! Learned-optimizer (L2O) meta-training on the host: the names an L2O
//! bundle uses ([`L2oLayout`]) and truncated BPTT from the compiled step and
//! step-VJP graphs ([`bptt`]), the host meta-optimizer ([`meta_opt`]) and
//! one meta-iteration of unrolls ([`train`]) with MNIST batches ([`data`]).
//!
//! The compiler (`metac_compiler::l2o`) writes the bundle's typed metadata
//! ([`L2oMeta`], `meta.l2o`): the layout of names by role, the regulariser
//! and imitation settings and how to draw fresh problems. The names both
//! sides share are the contract's (`metac_contract::l2o`), re-exported here.

pub mod bptt;
pub mod curriculum;
pub mod data;
pub mod imitation;
pub mod meta_opt;
pub mod regularizer;
pub mod run;
pub mod train;

pub use bptt::Named;
pub use bptt::{
    meta_loss_term, truncated_bptt, BpttResult, GraphRunner, MetaLossTerm, Role, SessionRunner,
    StepRunner, StepTensor, Unroll,
};
pub use data::MnistUnrollData;
pub use meta_opt::{CompiledMetaUpdate, MetaUpdate, RmsProp};
pub use metac_contract::l2o::{
    chunk_name, ct_name, d_name, ms_name, next_name, objective_grad_name, Curriculum, DataKind,
    ImitationSpec, L2oInit, L2oLayout, L2oMeta, ProbeInput, ProbeKind, RegularizeTime,
    RegularizerSchedule, RmsPropConfig, RunSettings, CT, D, META_UPDATE, MINIBATCH_LOSS, NEXT,
    OBJECTIVE, OBJECTIVE_CHUNK, OBJECTIVE_GRAD, REG, STEP_UNREGULARIZED, STEP_VJP_UNREGULARIZED,
};
pub use train::{meta_iteration, MetaIterationReport, UnrollData, UnrollSchedule};
