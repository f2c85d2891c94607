//! The data side of `metac eval`: MNIST problems draw minibatches from a
//! split; data-free problems take none, and the MNIST flags are rejected
//! for them.

use anyhow::{ensure, Result};
use metac_compiler::models::problems::Problem;
use metac_contract::l2o::DataKind;
use metac_runtime::data::mnist::{self, Split};
use metac_runtime::metatest::Batches;

use super::{Args, SplitChoice, DEFAULT_BATCH_SIZE, DEFAULT_EVAL_BATCH_SIZE};

/// The data of an MNIST problem: the split, the batch sizes and, per seed,
/// the minibatches (shared by every optimizer).
pub struct MnistData {
    pub choice: SplitChoice,
    pub split: Split,
    pub batch_size: usize,
    /// Clamped to the split size.
    pub eval_batch_size: usize,
    pub batches: Vec<Batches>,
}

/// Whether `problem` needs MNIST; for data-free problems the MNIST flags
/// are rejected, for MNIST problems their values are checked.
pub fn needs_mnist(a: &Args, problem: &dyn Problem) -> Result<bool> {
    ensure!(a.batch_size != Some(0), "--batch-size must be at least 1");
    ensure!(
        a.eval_batch_size != Some(0),
        "--eval-batch-size must be at least 1"
    );
    match problem.needs_data() {
        Some(DataKind::Mnist) => Ok(true),
        Some(DataKind::Facts) => anyhow::bail!(
            "problem '{}' is a language model on the fact world, which metac eval does not meta-test",
            problem.name()
        ),
        None => {
            let given: Vec<&str> = [
                (a.split.is_some(), "--split"),
                (a.data_dir.is_some(), "--data-dir"),
                (a.batch_size.is_some(), "--batch-size"),
                (a.eval_batch_size.is_some(), "--eval-batch-size"),
            ]
            .into_iter()
            .filter_map(|(g, f)| g.then_some(f))
            .collect();
            ensure!(
                given.is_empty(),
                "problem '{}' is data-free (no minibatches, no split), so {} does not apply; leave it out",
                problem.name(),
                given.join(", ")
            );
            Ok(false)
        }
    }
}

impl MnistData {
    pub fn load(a: &Args, seeds: &[u64]) -> Result<Self> {
        let choice = a.split.unwrap_or(SplitChoice::Test);
        let dir = a.data_dir.clone().unwrap_or_else(mnist::default_dir);
        let m = mnist::load(&dir)?;
        let split = match choice {
            SplitChoice::Test => m.test,
            SplitChoice::Validation => m.validation,
            SplitChoice::Train => m.train,
        };
        let batch_size = a.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        let batches = seeds
            .iter()
            .map(|&s| Batches::generate(split.len(), batch_size, a.steps, s))
            .collect::<Result<_>>()?;
        Ok(MnistData {
            choice,
            eval_batch_size: a
                .eval_batch_size
                .unwrap_or(DEFAULT_EVAL_BATCH_SIZE)
                .min(split.len()),
            split,
            batch_size,
            batches,
        })
    }
}
