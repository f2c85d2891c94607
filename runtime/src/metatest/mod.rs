//! Meta-test driver: run optimizers (hand-designed baselines or a learned
//! optimizer, all as compiled `train_step` graphs) on an MNIST problem for a
//! fixed number of steps, record the minibatch loss at every step, evaluate
//! the final parameters on a whole data split, and write the curves (CSV) and
//! a summary over seeds (JSON).
//!
//! The graphs come from the compiler (`metac_compiler::metatest`); this
//! module only needs the names in [`TrainStepIo`] and [`EvalIo`]:
//!
//! * `train_step`: inputs = parameters, optimizer state, optimizer weights
//!   (`phi`, empty for baselines), the minibatch (`x f32[B,784]`, `y i64[B]`);
//!   outputs = new parameters, new state, and `loss`, the minibatch loss at
//!   the parameters *before* the update.
//! * `evaluate`: inputs = parameters and an evaluation batch (`x f32[E,784]`,
//!   `y i64[E]`); outputs = mean `loss` and `accuracy` over the batch.
//!
//! **Batches** ([`Batches`]): the minibatch indices are generated on the host
//! from the seed alone (SplitMix64; one Fisher-Yates shuffle of the split per
//! epoch, consecutive slices of it as minibatches, the remainder of an epoch
//! dropped), so every optimizer sees exactly the same batches for a given
//! seed. Rows are gathered on the host.
//!
//! **Steps** are numbered from 1: `losses[t - 1]` is the loss of step `t`.
//!
//! **Divergence**: when a step's loss is not finite the run stops; the
//! non-finite value is not stored (`losses` keeps the finite prefix), the run
//! is marked diverged with the step number, and it is not evaluated. A run
//! whose final evaluation is not finite is also marked diverged (at step
//! `steps + 1`). Diverged runs are counted in the summary and left out of its
//! means.
//!
//! **Evaluation**: the split is cut into consecutive chunks of the evaluation
//! batch size `E` (a static graph dimension); the loss and accuracy are the
//! means of the per-chunk means (exact when `E` divides the split size, as
//! `E = 1000` does for the 10,000 test images). A remainder shorter than `E`
//! is left out; [`RunResult::eval_examples`] says how many were used.

mod report;

pub use report::{MetaTestResults, OptimizerSummary, Stat, Summary};

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};

use crate::backend::Session;
use crate::data::mnist::{Split, PIXELS};
use crate::tensor::HostTensor;

/// Names of the `train_step` graph's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainStepIo {
    /// Parameter inputs, in the problem's order.
    pub params: Vec<String>,
    /// Optimizer state inputs.
    pub state: Vec<String>,
    /// Optimizer weights (learned optimizers; empty for baselines).
    pub phi: Vec<String>,
    /// Minibatch inputs: for MNIST problems `[x, y]`.
    pub batch: Vec<String>,
    /// Outputs holding the new parameters (same order as `params`).
    pub new_params: Vec<String>,
    /// Outputs holding the new state (same order as `state`).
    pub new_state: Vec<String>,
    /// The scalar minibatch loss at the parameters before the update.
    pub loss: String,
    /// Minibatch size `B` the graph was built for.
    pub batch_size: usize,
}

/// Names of the `evaluate` graph's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalIo {
    /// Parameter inputs, in the problem's order (same names as the
    /// `train_step` parameters).
    pub params: Vec<String>,
    /// Evaluation batch inputs: `[x, y]`.
    pub batch: Vec<String>,
    /// Scalar mean loss over the batch.
    pub loss: String,
    /// Scalar fraction classified correctly.
    pub accuracy: String,
    /// Evaluation batch size `E` the graph was built for.
    pub batch_size: usize,
}

/// Converts a graph constant (e.g. a problem's initial parameter values) to
/// a host tensor.
pub fn host_tensor(t: &metac_graphs::Tensor) -> HostTensor {
    use metac_graphs::TensorData;
    let shape = IxDyn(&t.shape);
    match &t.data {
        TensorData::F32(v) => {
            HostTensor::F32(ArrayD::from_shape_vec(shape, v.clone()).expect("shape matches data"))
        }
        TensorData::I64(v) => {
            HostTensor::I64(ArrayD::from_shape_vec(shape, v.clone()).expect("shape matches data"))
        }
        TensorData::Bool(v) => {
            HostTensor::Bool(ArrayD::from_shape_vec(shape, v.clone()).expect("shape matches data"))
        }
    }
}

// ---- batches ------------------------------------------------------------------

pub use crate::rng::SplitMix64;

/// Pre-generated minibatch indices: `steps` batches of `batch_size` rows of
/// a split of `n` examples, determined by the seed alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batches {
    pub batch_size: usize,
    /// `steps * batch_size` row indices, batch after batch.
    pub indices: Vec<u32>,
}

impl Batches {
    /// Shuffle `0..n` per epoch (Fisher-Yates on SplitMix64 seeded with
    /// `seed`), cut each permutation into consecutive batches, drop the
    /// epoch's remainder.
    pub fn generate(n: usize, batch_size: usize, steps: usize, seed: u64) -> Result<Self> {
        ensure!(batch_size > 0, "the batch size must be at least 1");
        ensure!(
            n >= batch_size,
            "the split has {n} examples, fewer than one batch of {batch_size}"
        );
        ensure!(
            n <= u32::MAX as usize,
            "the split is too large ({n} examples)"
        );
        let mut rng = SplitMix64::new(seed);
        let mut indices = Vec::with_capacity(steps * batch_size);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        let per_epoch = n / batch_size;
        while indices.len() < steps * batch_size {
            for i in (1..n).rev() {
                let j = rng.below(i + 1);
                perm.swap(i, j);
            }
            let need = steps - indices.len() / batch_size;
            let take = need.min(per_epoch) * batch_size;
            indices.extend_from_slice(&perm[..take]);
        }
        Ok(Batches {
            batch_size,
            indices,
        })
    }

    pub fn steps(&self) -> usize {
        self.indices.len() / self.batch_size
    }

    /// The row indices of step `t` (0-based).
    pub fn batch(&self, t: usize) -> &[u32] {
        &self.indices[t * self.batch_size..(t + 1) * self.batch_size]
    }
}

/// Gathers rows of `split` into `x f32[B,784]`, `y i64[B]`.
pub fn gather(split: &Split, rows: impl IntoIterator<Item = usize>) -> (HostTensor, HostTensor) {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for r in rows {
        x.extend_from_slice(split.image(r));
        y.push(split.labels[r]);
    }
    let b = y.len();
    (
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, PIXELS]), x).expect("gather: shape")),
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b]), y).expect("gather: shape")),
    )
}

// ---- one run --------------------------------------------------------------------

/// What one optimizer starts from.
#[derive(Clone, Debug)]
pub struct RunInit {
    /// Label of the optimizer in curves and summaries (e.g. `adam-1e-3`).
    pub optimizer: String,
    /// Initial parameters, in [`TrainStepIo::params`] order.
    pub params: Vec<HostTensor>,
    /// Initial optimizer state, in [`TrainStepIo::state`] order.
    pub state: Vec<HostTensor>,
    /// Optimizer weights, in [`TrainStepIo::phi`] order (empty for baselines).
    pub phi: Vec<HostTensor>,
}

/// The record of one optimizer on one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub optimizer: String,
    pub seed: u64,
    /// Minibatch loss of steps `1..=losses.len()` (finite values only).
    pub losses: Vec<f32>,
    /// Number of steps asked for.
    pub steps: usize,
    /// The step at which the loss became non-finite (`steps + 1` when only
    /// the final evaluation was), if any.
    pub diverged_at: Option<usize>,
    /// Mean loss over the evaluated examples of the split (None if diverged
    /// or not evaluated).
    pub eval_loss: Option<f64>,
    /// Accuracy over the evaluated examples (None if diverged or not
    /// evaluated).
    pub eval_accuracy: Option<f64>,
    /// Number of examples the evaluation covered.
    pub eval_examples: usize,
}

impl RunResult {
    pub fn diverged(&self) -> bool {
        self.diverged_at.is_some()
    }
}

fn scalar(outs: &HashMap<String, HostTensor>, name: &str) -> Result<f32> {
    outs.get(name)
        .with_context(|| format!("the graph has no output '{name}'"))?
        .to_scalar_f32()
}

fn take_all(
    outs: &mut HashMap<String, HostTensor>,
    names: &[String],
    what: &str,
) -> Result<Vec<HostTensor>> {
    names
        .iter()
        .map(|n| {
            outs.remove(n)
                .with_context(|| format!("train_step has no {what} output '{n}'"))
        })
        .collect()
}

/// Runs one optimizer for `batches.steps()` steps on `data`, then (if
/// `eval` is given and the run did not diverge) evaluates the final
/// parameters on `eval_data` in chunks.
///
/// Inputs the session does not list (e.g. removed as unused when the graph
/// was optimised) are not fed.
#[allow(clippy::too_many_arguments)]
pub fn run_optimizer(
    train: &mut dyn Session,
    io: &TrainStepIo,
    init: &RunInit,
    data: &Split,
    batches: &Batches,
    seed: u64,
    eval: Option<(&mut dyn Session, &EvalIo, &Split)>,
) -> Result<RunResult> {
    ensure!(
        io.batch.len() == 2,
        "train_step: expected the batch inputs [x, y], got {:?}",
        io.batch
    );
    ensure!(
        batches.batch_size == io.batch_size,
        "train_step was built for batch {}, but the batches have {}",
        io.batch_size,
        batches.batch_size
    );
    ensure!(
        init.params.len() == io.params.len(),
        "expected {} initial parameters, got {}",
        io.params.len(),
        init.params.len()
    );
    ensure!(
        init.state.len() == io.state.len(),
        "expected {} initial state tensors, got {}",
        io.state.len(),
        init.state.len()
    );
    ensure!(
        init.phi.len() == io.phi.len(),
        "expected {} optimizer weights, got {}",
        io.phi.len(),
        init.phi.len()
    );
    let wanted: std::collections::HashSet<String> = train.input_names().into_iter().collect();
    let mut params = init.params.clone();
    let mut state = init.state.clone();
    let mut losses = Vec::with_capacity(batches.steps());
    let mut diverged_at = None;
    for t in 0..batches.steps() {
        let (x, y) = gather(data, batches.batch(t).iter().map(|&r| r as usize));
        let mut feed: Vec<(&str, &HostTensor)> =
            Vec::with_capacity(params.len() + state.len() + init.phi.len() + 2);
        for (n, v) in io
            .params
            .iter()
            .zip(&params)
            .chain(io.state.iter().zip(&state))
            .chain(io.phi.iter().zip(&init.phi))
        {
            if wanted.contains(n) {
                feed.push((n, v));
            }
        }
        feed.push((&io.batch[0], &x));
        feed.push((&io.batch[1], &y));
        let mut outs: HashMap<String, HostTensor> = train
            .run(&feed)
            .with_context(|| {
                format!(
                    "{} seed {seed}: train_step at step {}",
                    init.optimizer,
                    t + 1
                )
            })?
            .into_iter()
            .collect();
        let loss = scalar(&outs, &io.loss)?;
        if !loss.is_finite() {
            diverged_at = Some(t + 1);
            break;
        }
        losses.push(loss);
        params = take_all(&mut outs, &io.new_params, "parameter")?;
        state = take_all(&mut outs, &io.new_state, "state")?;
    }
    let mut result = RunResult {
        optimizer: init.optimizer.clone(),
        seed,
        losses,
        steps: batches.steps(),
        diverged_at,
        eval_loss: None,
        eval_accuracy: None,
        eval_examples: 0,
    };
    if let (None, Some((sess, eio, split))) = (diverged_at, eval) {
        let (loss, acc, n) = evaluate(sess, eio, &params, split)?;
        if loss.is_finite() && acc.is_finite() {
            result.eval_loss = Some(loss);
            result.eval_accuracy = Some(acc);
            result.eval_examples = n;
        } else {
            result.diverged_at = Some(batches.steps() + 1);
        }
    }
    Ok(result)
}

/// Mean loss and accuracy of `params` over `split`, in consecutive chunks of
/// `io.batch_size` (a remainder shorter than that is left out); returns
/// `(loss, accuracy, examples used)`.
pub fn evaluate(
    sess: &mut dyn Session,
    io: &EvalIo,
    params: &[HostTensor],
    split: &Split,
) -> Result<(f64, f64, usize)> {
    ensure!(
        io.batch.len() == 2,
        "evaluate: expected the batch inputs [x, y], got {:?}",
        io.batch
    );
    ensure!(
        params.len() == io.params.len(),
        "evaluate: expected {} parameters, got {}",
        io.params.len(),
        params.len()
    );
    let e = io.batch_size;
    let chunks = split.len() / e.max(1);
    if e == 0 || chunks == 0 {
        bail!(
            "evaluate: the split has {} examples, fewer than one evaluation batch of {e}",
            split.len()
        );
    }
    let (mut loss, mut acc) = (0.0f64, 0.0f64);
    for c in 0..chunks {
        let rows: Vec<u32> = ((c * e) as u32..((c + 1) * e) as u32).collect();
        let (x, y) = gather(split, rows.iter().map(|&r| r as usize));
        let mut feed: Vec<(&str, &HostTensor)> =
            io.params.iter().map(String::as_str).zip(params).collect();
        feed.push((&io.batch[0], &x));
        feed.push((&io.batch[1], &y));
        let outs: HashMap<String, HostTensor> =
            sess.run(&feed).context("evaluate")?.into_iter().collect();
        loss += scalar(&outs, &io.loss)? as f64;
        acc += scalar(&outs, &io.accuracy)? as f64;
    }
    Ok((loss / chunks as f64, acc / chunks as f64, chunks * e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `train_step`: one scalar parameter `p`, `loss = p`, `p' = p + 1`,
    /// and the loss turns NaN once `p >= limit`.
    struct Fake {
        limit: f32,
    }

    impl Session for Fake {
        fn input_names(&self) -> Vec<String> {
            vec!["p".into(), "x".into(), "y".into()]
        }
        fn output_names(&self) -> Vec<String> {
            vec!["new.p".into(), "loss".into()]
        }
        fn run(&mut self, inputs: &[(&str, &HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
            let p = inputs
                .iter()
                .find(|(n, _)| *n == "p")
                .unwrap()
                .1
                .to_scalar_f32()?;
            let loss = if p >= self.limit { f32::NAN } else { p };
            Ok(vec![
                ("new.p".into(), HostTensor::scalar_f32(p + 1.0)),
                ("loss".into(), HostTensor::scalar_f32(loss)),
            ])
        }
    }

    fn io() -> TrainStepIo {
        TrainStepIo {
            params: vec!["p".into()],
            state: vec![],
            phi: vec![],
            batch: vec!["x".into(), "y".into()],
            new_params: vec!["new.p".into()],
            new_state: vec![],
            loss: "loss".into(),
            batch_size: 2,
        }
    }

    fn split(n: usize) -> Split {
        Split {
            images: vec![0.0; n * PIXELS],
            labels: (0..n as i64).map(|i| i % 10).collect(),
        }
    }

    #[test]
    fn divergence_stops_the_run() {
        let init = RunInit {
            optimizer: "fake".into(),
            params: vec![HostTensor::scalar_f32(0.0)],
            state: vec![],
            phi: vec![],
        };
        let data = split(10);
        let batches = Batches::generate(10, 2, 8, 1).unwrap();
        let r = run_optimizer(
            &mut Fake { limit: 1e9 },
            &io(),
            &init,
            &data,
            &batches,
            1,
            None,
        )
        .unwrap();
        assert_eq!(r.losses, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert!(!r.diverged());
        let r = run_optimizer(
            &mut Fake { limit: 3.0 },
            &io(),
            &init,
            &data,
            &batches,
            1,
            None,
        )
        .unwrap();
        assert_eq!(r.losses, vec![0.0, 1.0, 2.0]);
        assert_eq!(r.diverged_at, Some(4));
    }

    #[test]
    fn gather_picks_rows() {
        let mut s = split(4);
        s.images[2 * PIXELS] = 0.5;
        let (x, y) = gather(&s, [2, 0]);
        assert_eq!(x.shape(), &[2, PIXELS]);
        assert_eq!(x.as_f32().unwrap()[[0, 0]], 0.5);
        assert_eq!(y.as_i64().unwrap().as_slice().unwrap(), &[2, 0]);
    }
}
