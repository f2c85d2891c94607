//! The contract between metac's compiler and its runtime.
//!
//! Everything both sides must agree on lives here, so that the compiler
//! never depends on the runtime and the runtime runs a bundle with nothing
//! from the compiler:
//!
//! * [`bundle`]: the artifact bundle (manifest types, writing, loading and
//!   validation; `docs/bundle.md` describes the format);
//! * [`l2o`]: the learned-optimizer workload's graph and buffer names, its
//!   typed metadata record ([`l2o::L2oMeta`]) and run settings;
//! * [`editor`]: the model-editing workload's config, run settings and
//!   typed metadata ([`editor::EditorMeta`]);
//! * [`lm`]: the language-model workload's model shape, data, config,
//!   run settings and typed metadata ([`lm::LmMeta`]);
//! * [`moe`]: the mixture-of-experts workload's model shape;
//! * [`init`]: rules for drawing initial values from a seed, which bundles
//!   carry so the runtime draws what the compiler would;
//! * [`io`]: the names of graphs built on the fly (training step,
//!   evaluation, Hessian-vector product);
//! * [`fsutil`]: atomic writes and content hashes.

pub mod bundle;
pub mod editor;
pub mod fsutil;
pub mod init;
pub mod io;
pub mod l2o;
pub mod lm;
pub mod moe;
