//! The language model ([`Gpt`]) as a [`Problem`]: next-token cross-entropy
//! on fixed-length token sequences, so that the shared graph builders apply
//! to it (`metatest::build_train_step` gives its compiled training step:
//! forward, gradient and an optimizer such as Adam, as one graph).

use metac_contract::init::TensorInit;
use metac_contract::l2o::DataKind;
use metac_graphs::{DType, Graph, NodeId};

use super::problems::Problem;
use super::transformer::Gpt;

/// `gpt` on batches of `batch` sequences of `seq` tokens: inputs `tokens`
/// and `targets` (i64 `[batch, seq]`) and `weights` (f32 `[batch, seq]`, 1
/// where a target counts); the loss is [`Gpt::loss`].
pub struct LmProblem {
    pub name: String,
    pub gpt: Gpt,
    pub batch: usize,
    pub seq: usize,
}

impl LmProblem {
    /// # Panics
    /// If `seq` exceeds the model's context or either size is 0.
    pub fn new(name: &str, gpt: Gpt, batch: usize, seq: usize) -> Self {
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
        vec![
            ("tokens".into(), DType::I64, s.clone()),
            ("targets".into(), DType::I64, s.clone()),
            ("weights".into(), DType::F32, s),
        ]
    }
    fn loss(&self, g: &mut Graph, params: &[NodeId], batch: &[NodeId]) -> NodeId {
        self.gpt.loss(g, params, batch[0], batch[1], batch[2])
    }
    fn needs_data(&self) -> Option<DataKind> {
        Some(DataKind::Facts)
    }
}
