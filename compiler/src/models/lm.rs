//! The language model ([`Gpt`]) as a [`Problem`], so that the shared graph
//! builders apply to it (`metatest::build_train_step` gives its compiled
//! training step: forward, gradient and an optimizer such as Adam, as one
//! graph; `metatest::build_evaluate` its loss and accuracy).

use metac_contract::init::TensorInit;
use metac_contract::l2o::DataKind;
use metac_graphs::{DType, Graph, NodeId};

use super::problems::{accuracy, Problem};
use super::transformer::Gpt;

/// Which tokens the loss predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LmTarget {
    /// One answer token per prompt (a fact's object): inputs `tokens` (i64
    /// `[B, T]`), `positions` (i64 `[B]`, the index of the prompt's last
    /// token) and `answers` (i64 `[B]`); the loss is [`Gpt::answer_loss`],
    /// and the problem has an `accuracy` (answers ranked first).
    Answer,
    /// Next-token prediction along whole sequences: inputs `tokens`,
    /// `targets` (i64 `[B, T]`) and `weights` (f32 `[B, T]`, 1 where a
    /// target counts); the loss is [`Gpt::loss`].
    Sequence,
}

/// `gpt` on batches of `batch` sequences of `seq` tokens; see [`LmTarget`]
/// for the inputs and the loss.
pub struct LmProblem {
    pub name: String,
    pub gpt: Gpt,
    pub batch: usize,
    pub seq: usize,
    pub target: LmTarget,
}

impl LmProblem {
    /// # Panics
    /// If `seq` exceeds the model's context or either size is 0.
    pub fn new(name: &str, gpt: Gpt, batch: usize, seq: usize, target: LmTarget) -> Self {
        assert!(batch > 0 && seq > 0, "LmProblem: empty batches");
        assert!(
            seq <= gpt.config.context,
            "LmProblem: {seq} tokens exceed the context {}",
            gpt.config.context
        );
        LmProblem {
            name: name.into(),
            gpt,
            batch,
            seq,
            target,
        }
    }
}

impl Problem for LmProblem {
    fn name(&self) -> &str {
        &self.name
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.gpt.param_shapes()
    }
    fn init_rules(&self) -> Option<Vec<TensorInit>> {
        Some(self.gpt.init_rules())
    }
    fn batch_inputs(&self) -> Vec<(String, DType, Vec<usize>)> {
        let s = vec![self.batch, self.seq];
        match self.target {
            LmTarget::Answer => vec![
                ("tokens".into(), DType::I64, s),
                ("positions".into(), DType::I64, vec![self.batch]),
                ("answers".into(), DType::I64, vec![self.batch]),
            ],
            LmTarget::Sequence => vec![
                ("tokens".into(), DType::I64, s.clone()),
                ("targets".into(), DType::I64, s.clone()),
                ("weights".into(), DType::F32, s),
            ],
        }
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        match self.target {
            LmTarget::Answer => self
                .gpt
                .answer_loss(g, params, batch[0], batch[1], batch[2]),
            LmTarget::Sequence => self.gpt.loss(g, params, batch[0], batch[1], batch[2]),
        }
    }
    fn accuracy(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> Option<NodeId> {
        match self.target {
            LmTarget::Answer => {
                let logits = self.gpt.logits_at(g, params, batch[0], batch[1]);
                Some(accuracy(g, logits, batch[2]))
            }
            LmTarget::Sequence => None,
        }
    }
    fn needs_data(&self) -> Option<DataKind> {
        Some(DataKind::Facts)
    }
}
