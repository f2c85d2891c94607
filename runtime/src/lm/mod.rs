//! The language-model workload: batches of prompts with one answer token,
//! the `evaluate` graph over any number of prompts ([`Evaluator`]), and
//! training an LM bundle with the generic driver ([`run::LmWorkload`]).
//!
//! The graphs and their names are `metac_contract::lm`'s.

pub mod run;

use anyhow::{ensure, Result};
use metac_contract::bundle::Bundle;
use metac_contract::lm::{LmMeta, LM_EVALUATE};
use ndarray::{ArrayD, IxDyn};

use crate::backend::{Backend, Session};
use crate::data::facts::Prompt;
use crate::tensor::{HostTensor, Named};

/// `tokens` (i64 `[B, T]`, the prompt then padding 0), `positions` (i64
/// `[B]`, the prompt's last index) and `answers` (i64 `[B]`) of `prompts`;
/// rows past the prompts repeat the first (the caller ignores them).
///
/// # Errors
/// When a prompt is empty or longer than `t`.
pub fn answer_batch(prompts: &[&Prompt], b: usize, t: usize) -> Result<[HostTensor; 3]> {
    ensure!(
        !prompts.is_empty() && prompts.len() <= b,
        "a batch of {} prompts for {b} rows",
        prompts.len()
    );
    let (mut tok, mut pos, mut ans) = (vec![0i64; b * t], vec![0i64; b], vec![0i64; b]);
    for i in 0..b {
        let p = prompts.get(i).unwrap_or(&prompts[0]);
        let n = p.tokens.len();
        ensure!(
            n >= 1 && n <= t,
            "a prompt of {n} tokens does not fit the compiled sequence length {t}"
        );
        for (j, &x) in p.tokens.iter().enumerate() {
            tok[i * t + j] = i64::from(x);
        }
        pos[i] = (n - 1) as i64;
        ans[i] = i64::from(p.answer);
    }
    let i64s = |shape: &[usize], v: Vec<i64>| {
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).expect("sized"))
    };
    Ok([i64s(&[b, t], tok), i64s(&[b], pos), i64s(&[b], ans)])
}

/// Per prompt: the answer's negative log-likelihood and whether the model
/// ranks it first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    pub nll: Vec<f32>,
    pub correct: Vec<bool>,
}

impl Scores {
    /// Fraction ranked first (0 for no prompts).
    pub fn accuracy(&self) -> f64 {
        if self.correct.is_empty() {
            return 0.0;
        }
        self.correct.iter().filter(|&&c| c).count() as f64 / self.correct.len() as f64
    }

    /// Mean negative log-likelihood (0 for no prompts).
    pub fn mean_nll(&self) -> f64 {
        if self.nll.is_empty() {
            return 0.0;
        }
        self.nll.iter().map(|&x| f64::from(x)).sum::<f64>() / self.nll.len() as f64
    }
}

/// The bundle's `evaluate` graph, run over prompt sets of any size in
/// batches of its compiled size.
pub struct Evaluator {
    session: Box<dyn Session>,
    batch: usize,
    seq: usize,
}

impl Evaluator {
    pub fn new(bundle: &Bundle, meta: &LmMeta, backend: &dyn Backend) -> Result<Self> {
        Ok(Self::from_session(
            backend.load(&bundle.graph_bytes(LM_EVALUATE)?, LM_EVALUATE)?,
            meta.eval_batch,
            meta.seq,
        ))
    }

    /// An `evaluate` graph (see `metac_contract::lm`) compiled for batches
    /// of `batch` prompts of `seq` tokens.
    pub fn from_session(session: Box<dyn Session>, batch: usize, seq: usize) -> Self {
        Evaluator {
            session,
            batch,
            seq,
        }
    }

    /// The scores of `prompts` under parameters `params` (by name).
    pub fn scores(&mut self, params: &Named<HostTensor>, prompts: &[Prompt]) -> Result<Scores> {
        let mut s = Scores::default();
        for chunk in prompts.chunks(self.batch) {
            let refs: Vec<&Prompt> = chunk.iter().collect();
            let data = answer_batch(&refs, self.batch, self.seq)?;
            let mut ins: Vec<(&str, &HostTensor)> =
                params.iter().map(|(n, t)| (n.as_str(), t)).collect();
            ins.extend(["tokens", "positions", "answers"].into_iter().zip(&data));
            let out = self.session.run(&ins)?;
            let get = |name: &str| -> Result<Vec<f32>> {
                let t = out
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| anyhow::anyhow!("evaluate: no output '{name}'"))?;
                Ok(t.as_f32()?.iter().copied().collect())
            };
            let (nll, correct) = (get("nll")?, get("correct")?);
            s.nll.extend(&nll[..chunk.len()]);
            s.correct
                .extend(correct[..chunk.len()].iter().map(|&c| c > 0.5));
        }
        Ok(s)
    }
}
