//! Meta-test driver: run optimizers (hand-designed baselines or a learned
//! optimizer, all as compiled `train_step` graphs) on a problem for a fixed
//! number of steps, record the loss at every step, evaluate the final
//! parameters, and write the curves (CSV), a summary over seeds (JSON) and
//! the final parameters (safetensors, [`write_params`]).
//!
//! The graphs come from the compiler (`metac_compiler::metatest`); this
//! module only needs the names in [`TrainStepIo`] and [`EvalIo`]:
//!
//! * `train_step`: inputs = parameters, optimizer state, optimizer weights
//!   (`phi`, empty for baselines), and for MNIST problems the minibatch
//!   (`x f32[B,784]`, `y i64[B]`; data-free problems have none); outputs =
//!   new parameters, new state, and `loss`, the loss at the parameters
//!   *before* the update (the minibatch loss, or for data-free problems the
//!   loss itself).
//! * `evaluate`: inputs = parameters and, for MNIST problems, an evaluation
//!   batch (`x f32[E,784]`, `y i64[E]`); outputs = mean `loss` and, for
//!   classifiers, `accuracy`.
//!
//! **Data** ([`StepData`]): for MNIST problems the minibatch indices are
//! generated on the host from the seed alone ([`Batches`]: SplitMix64; one
//! Fisher-Yates shuffle of the split per epoch, consecutive slices of it as
//! minibatches, the remainder of an epoch dropped), so every optimizer sees
//! exactly the same batches for a given seed; rows are gathered on the host.
//! Data-free (synthetic) problems have their data baked into the graphs and
//! no split.
//!
//! **Steps** are numbered from 1: `losses[t - 1]` is the loss of step `t`.
//!
//! **Divergence**: a run diverges at the first step whose loss is not
//! finite or exceeds [`DIVERGENCE_FACTOR`] times the loss of step 1 (where
//! that is positive): an optimizer whose loss climbs from 2 to 1e11 has
//! diverged, though every value is finite. A run that exceeds the bound goes
//! on (its curve shows what happened); a non-finite loss stops it, and the
//! non-finite value is not stored (`losses` keeps the finite prefix). A
//! diverged run is not evaluated. A run whose final evaluation is not finite
//! is also marked diverged (at step `steps + 1`). Diverged runs are counted,
//! with their steps, in the summary and the plot, and left out of its means.
//!
//! **Evaluation** ([`Evaluation`]): for MNIST problems the split is cut into
//! consecutive chunks of the evaluation batch size `E` (a static graph
//! dimension); the loss and accuracy are the means of the per-chunk means
//! (exact when `E` divides the split size, as `E = 1000` does for the 10,000
//! test images). A remainder shorter than `E` is left out;
//! [`RunResult::eval_examples`] says how many were used. For data-free
//! problems the evaluation is one run of the graph: the loss at the final
//! parameters (and the accuracy on the baked data where the problem is a
//! classifier).

mod batches;
mod params;
mod report;

pub use batches::{gather, Batches};
pub use params::{params_path, write_params};
pub use report::{MetaTestResults, OptimizerSummary, Stat, Summary};

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};

pub use metac_contract::io::{EvalIo, RunInit, TrainStepIo};

/// A run has diverged once its loss exceeds this many times the loss of its
/// first step (where that is positive); see the module docs.
pub const DIVERGENCE_FACTOR: f32 = 10.0;

use crate::backend::Session;
use crate::data::mnist::Split;
use crate::tensor::HostTensor;

// ---- one run --------------------------------------------------------------------

/// What `train_step` is fed per step besides parameters, state and weights.
#[derive(Clone, Copy, Debug)]
pub enum StepData<'a> {
    /// MNIST problems: step `t` gets the rows `batches.batch(t)` of `split`
    /// as `[x, y]`.
    Mnist {
        split: &'a Split,
        batches: &'a Batches,
    },
    /// Data-free problems: `steps` steps without batch inputs.
    DataFree { steps: usize },
}

impl StepData<'_> {
    pub fn steps(&self) -> usize {
        match self {
            StepData::Mnist { batches, .. } => batches.steps(),
            StepData::DataFree { steps } => *steps,
        }
    }

    /// The batch inputs of step `t` (0-based), in `TrainStepIo::batch` order.
    fn inputs(&self, t: usize) -> Vec<HostTensor> {
        match self {
            StepData::Mnist { split, batches } => {
                let (x, y) = gather(split, batches.batch(t).iter().map(|&r| r as usize));
                vec![x, y]
            }
            StepData::DataFree { .. } => vec![],
        }
    }

    /// Checks that the graph takes these inputs.
    fn check(&self, io: &TrainStepIo) -> Result<()> {
        match self {
            StepData::Mnist { batches, .. } => {
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
            }
            StepData::DataFree { .. } => ensure!(
                io.batch.is_empty(),
                "train_step takes batch inputs {:?}, but the problem is data-free",
                io.batch
            ),
        }
        Ok(())
    }
}

/// The evaluation of the final parameters: the `evaluate` session, its
/// names, and the split for MNIST problems (`None` for data-free ones).
pub struct Evaluation<'a> {
    pub session: &'a mut dyn Session,
    pub io: &'a EvalIo,
    pub split: Option<&'a Split>,
}

/// The record of one optimizer on one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub optimizer: String,
    pub seed: u64,
    /// Loss of steps `1..=losses.len()` (finite values only).
    pub losses: Vec<f32>,
    /// Number of steps asked for.
    pub steps: usize,
    /// The first step whose loss was non-finite or above
    /// [`DIVERGENCE_FACTOR`] times the first step's (`steps + 1` when only
    /// the final evaluation was non-finite), if any.
    pub diverged_at: Option<usize>,
    /// Loss of the final parameters: the mean over the evaluated examples of
    /// the split, or for data-free problems the loss itself (None if
    /// diverged or not evaluated).
    pub eval_loss: Option<f64>,
    /// Accuracy of the final parameters (None if diverged, not evaluated,
    /// or the problem is not a classifier).
    pub eval_accuracy: Option<f64>,
    /// Number of examples the evaluation covered (0 for data-free problems).
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

/// Runs one optimizer for `data.steps()` steps, then (if `eval` is given and
/// the run did not diverge) evaluates the final parameters. Returns the
/// record and the final parameters (in [`TrainStepIo::params`] order; for a
/// run that diverged during training, the last finite ones).
///
/// Inputs the session does not list (e.g. removed as unused when the graph
/// was optimised) are not fed.
pub fn run_optimizer(
    train: &mut dyn Session,
    io: &TrainStepIo,
    init: &RunInit,
    data: StepData,
    seed: u64,
    eval: Option<Evaluation>,
) -> Result<(RunResult, Vec<HostTensor>)> {
    data.check(io)?;
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
    let mut params: Vec<HostTensor> = init.params.iter().map(HostTensor::from_graph).collect();
    let mut state: Vec<HostTensor> = init.state.iter().map(HostTensor::from_graph).collect();
    let phi: Vec<HostTensor> = init.phi.iter().map(HostTensor::from_graph).collect();
    let mut losses = Vec::with_capacity(data.steps());
    let mut diverged_at = None;
    for t in 0..data.steps() {
        let batch = data.inputs(t);
        let mut feed: Vec<(&str, &HostTensor)> =
            Vec::with_capacity(params.len() + state.len() + phi.len() + batch.len());
        for (n, v) in io
            .params
            .iter()
            .zip(&params)
            .chain(io.state.iter().zip(&state))
            .chain(io.phi.iter().zip(&phi))
        {
            if wanted.contains(n) {
                feed.push((n, v));
            }
        }
        feed.extend(io.batch.iter().map(String::as_str).zip(&batch));
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
            diverged_at.get_or_insert(t + 1);
            break;
        }
        if diverged_at.is_none()
            && losses
                .first()
                .is_some_and(|&l0| l0 > 0.0 && loss > DIVERGENCE_FACTOR * l0)
        {
            diverged_at = Some(t + 1);
        }
        losses.push(loss);
        params = take_all(&mut outs, &io.new_params, "parameter")?;
        state = take_all(&mut outs, &io.new_state, "state")?;
    }
    let mut result = RunResult {
        optimizer: init.optimizer.clone(),
        seed,
        losses,
        steps: data.steps(),
        diverged_at,
        eval_loss: None,
        eval_accuracy: None,
        eval_examples: 0,
    };
    if let (None, Some(ev)) = (diverged_at, eval) {
        let (loss, acc, n) = evaluate(ev.session, ev.io, &params, ev.split)?;
        if loss.is_finite() && acc.is_none_or(f64::is_finite) {
            result.eval_loss = Some(loss);
            result.eval_accuracy = acc;
            result.eval_examples = n;
        } else {
            result.diverged_at = Some(data.steps() + 1);
        }
    }
    Ok((result, params))
}

/// Loss and accuracy (where the graph has one) of `params`; returns
/// `(loss, accuracy, examples used)`.
///
/// With a split (MNIST problems): the means over `split` in consecutive
/// chunks of `io.batch_size` (a remainder shorter than that is left out).
/// Without (data-free problems): one run of the graph, 0 examples.
pub fn evaluate(
    sess: &mut dyn Session,
    io: &EvalIo,
    params: &[HostTensor],
    split: Option<&Split>,
) -> Result<(f64, Option<f64>, usize)> {
    ensure!(
        params.len() == io.params.len(),
        "evaluate: expected {} parameters, got {}",
        io.params.len(),
        params.len()
    );
    let mut run_once = |batch: &[HostTensor]| -> Result<(f64, Option<f64>)> {
        let mut feed: Vec<(&str, &HostTensor)> =
            io.params.iter().map(String::as_str).zip(params).collect();
        feed.extend(io.batch.iter().map(String::as_str).zip(batch));
        let outs: HashMap<String, HostTensor> =
            sess.run(&feed).context("evaluate")?.into_iter().collect();
        let acc = match &io.accuracy {
            Some(a) => Some(scalar(&outs, a)? as f64),
            None => None,
        };
        Ok((scalar(&outs, &io.loss)? as f64, acc))
    };
    let Some(split) = split else {
        ensure!(
            io.batch.is_empty(),
            "evaluate: the graph takes batch inputs {:?}, but no split was given",
            io.batch
        );
        let (loss, acc) = run_once(&[])?;
        return Ok((loss, acc, 0));
    };
    ensure!(
        io.batch.len() == 2,
        "evaluate: expected the batch inputs [x, y], got {:?}",
        io.batch
    );
    let e = io.batch_size;
    let chunks = split.len() / e.max(1);
    if e == 0 || chunks == 0 {
        bail!(
            "evaluate: the split has {} examples, fewer than one evaluation batch of {e}",
            split.len()
        );
    }
    let (mut loss, mut acc) = (0.0f64, None::<f64>);
    for c in 0..chunks {
        let (x, y) = gather(split, c * e..(c + 1) * e);
        let (l, a) = run_once(&[x, y])?;
        loss += l;
        if let Some(a) = a {
            *acc.get_or_insert(0.0) += a;
        }
    }
    let n = chunks as f64;
    Ok((loss / n, acc.map(|a| a / n), chunks * e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::PIXELS;

    /// A fake `train_step`: one scalar parameter `p`, `loss = p`, `p' = p + 1`,
    /// and the loss turns NaN once `p >= limit`; takes `[x, y]` when `batch`.
    struct Fake {
        limit: f32,
        batch: bool,
    }

    impl Session for Fake {
        fn input_names(&self) -> Vec<String> {
            let mut v = vec!["p".to_string()];
            if self.batch {
                v.extend(["x".into(), "y".into()]);
            }
            v
        }
        fn output_names(&self) -> Vec<String> {
            vec!["new.p".into(), "loss".into()]
        }
        fn run(&mut self, inputs: &[(&str, &HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
            assert_eq!(inputs.len(), self.input_names().len());
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

    fn io(batch: bool) -> TrainStepIo {
        TrainStepIo {
            params: vec!["p".into()],
            state: vec![],
            phi: vec![],
            batch: if batch {
                vec!["x".into(), "y".into()]
            } else {
                vec![]
            },
            new_params: vec!["new.p".into()],
            new_state: vec![],
            loss: "loss".into(),
            batch_size: if batch { 2 } else { 0 },
        }
    }

    fn split(n: usize) -> Split {
        Split {
            pixels: vec![0; n * PIXELS],
            labels: (0..n as i64).map(|i| i % 10).collect(),
        }
    }

    fn init() -> RunInit {
        RunInit {
            optimizer: "fake".into(),
            params: vec![metac_graphs::Tensor::f32(&[], vec![0.0])],
            state: vec![],
            phi: vec![],
        }
    }

    #[test]
    fn divergence_stops_the_run() {
        let data = split(10);
        let batches = Batches::generate(10, 2, 8, 1).unwrap();
        let mnist = StepData::Mnist {
            split: &data,
            batches: &batches,
        };
        let mut fake = Fake {
            limit: 1e9,
            batch: true,
        };
        let (r, p) = run_optimizer(&mut fake, &io(true), &init(), mnist, 1, None).unwrap();
        assert_eq!(r.losses, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert!(!r.diverged());
        assert_eq!(p[0].to_scalar_f32().unwrap(), 8.0);
        fake.limit = 3.0;
        let (r, p) = run_optimizer(&mut fake, &io(true), &init(), mnist, 1, None).unwrap();
        assert_eq!(r.losses, vec![0.0, 1.0, 2.0]);
        assert_eq!(r.diverged_at, Some(4));
        assert_eq!(p[0].to_scalar_f32().unwrap(), 3.0);
    }

    #[test]
    fn a_loss_ten_times_the_first_is_divergence_and_the_run_goes_on() {
        let mut fake = Fake {
            limit: 1e9,
            batch: false,
        };
        let start = RunInit {
            params: vec![metac_graphs::Tensor::f32(&[], vec![1.0])],
            ..init()
        };
        let data = StepData::DataFree { steps: 20 };
        let (r, _) = run_optimizer(&mut fake, &io(false), &start, data, 1, None).unwrap();
        // Step t's loss is t: step 11 is the first above 10 x 1.
        assert_eq!(r.diverged_at, Some(11));
        assert_eq!(r.losses.len(), 20, "the curve goes on past the bound");
        // A non-finite loss after the bound stops the run; the first step stays.
        fake.limit = 15.0;
        let (r, _) = run_optimizer(&mut fake, &io(false), &start, data, 1, None).unwrap();
        assert_eq!((r.diverged_at, r.losses.len()), (Some(11), 14));
    }

    #[test]
    fn data_free_runs_feed_no_batch() {
        let mut fake = Fake {
            limit: 1e9,
            batch: false,
        };
        let data = StepData::DataFree { steps: 4 };
        let (r, p) = run_optimizer(&mut fake, &io(false), &init(), data, 1, None).unwrap();
        assert_eq!(r.losses, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(p[0].to_scalar_f32().unwrap(), 4.0);
        // A graph with batch inputs cannot run data-free, and vice versa.
        assert!(run_optimizer(&mut fake, &io(true), &init(), data, 1, None).is_err());
        let s = split(4);
        let b = Batches::generate(4, 2, 1, 1).unwrap();
        let mnist = StepData::Mnist {
            split: &s,
            batches: &b,
        };
        assert!(run_optimizer(&mut fake, &io(false), &init(), mnist, 1, None).is_err());
    }
}
