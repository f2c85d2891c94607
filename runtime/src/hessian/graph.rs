//! Hessian-vector products as runs of a compiled HVP graph, averaged over
//! data chunks.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};

use metac_contract::io::HvpIo;

use super::Operator;
use crate::backend::Session;
use crate::tensor::HostTensor;

/// One slice of the data: the batch inputs of one graph run.
pub struct Chunk {
    /// Which of the operator's sessions runs it (graphs differ in their
    /// static batch size, e.g. a full chunk and the remainder).
    pub session: usize,
    /// Values of [`HvpIo::batch`], in order.
    pub batch: Vec<HostTensor>,
    /// Examples in the chunk (its weight in the mean).
    pub examples: usize,
}

/// The Hessian of the mean loss over all chunks' examples at the current
/// parameters: `H v = sum_c (n_c / N) H_c v`, where `H_c` is the Hessian of
/// chunk `c`'s mean loss. Exact for a loss that is a mean over examples;
/// data-free problems have a single chunk without batch inputs.
pub struct HvpOperator {
    sessions: Vec<Box<dyn Session>>,
    wanted: Vec<HashSet<String>>,
    io: HvpIo,
    chunks: Vec<Chunk>,
    params: Vec<HostTensor>,
    n: usize,
    graph_runs: usize,
}

impl HvpOperator {
    /// `sessions` all have the names of `io`; `chunks` may be empty only
    /// for data-free problems (one run of session 0 without batch inputs).
    pub fn new(sessions: Vec<Box<dyn Session>>, io: HvpIo, mut chunks: Vec<Chunk>) -> Result<Self> {
        ensure!(!sessions.is_empty(), "no HVP graph");
        if chunks.is_empty() {
            ensure!(
                io.batch.is_empty(),
                "the HVP graph takes data inputs {:?}, but no data was given",
                io.batch
            );
            chunks.push(Chunk {
                session: 0,
                batch: vec![],
                examples: 0,
            });
        }
        for c in &chunks {
            ensure!(
                c.session < sessions.len(),
                "chunk of unknown graph {}",
                c.session
            );
            ensure!(
                c.batch.len() == io.batch.len(),
                "a data chunk has {} inputs, the graph takes {}",
                c.batch.len(),
                io.batch.len()
            );
        }
        let wanted = sessions
            .iter()
            .map(|s| s.input_names().into_iter().collect())
            .collect();
        let n = io.num_params();
        Ok(HvpOperator {
            sessions,
            wanted,
            io,
            chunks,
            params: vec![],
            n,
            graph_runs: 0,
        })
    }

    /// Sets the parameters the Hessian is taken at (f32, in [`HvpIo::params`] order).
    pub fn set_params(&mut self, params: Vec<HostTensor>) -> Result<()> {
        ensure!(
            params.len() == self.io.params.len(),
            "expected {} parameter tensors, got {}",
            self.io.params.len(),
            params.len()
        );
        for ((p, s), name) in params.iter().zip(&self.io.shapes).zip(&self.io.params) {
            p.as_f32().with_context(|| format!("parameter '{name}'"))?;
            ensure!(
                p.shape() == s.as_slice(),
                "parameter '{name}' has shape {:?}, expected {:?}",
                p.shape(),
                s
            );
        }
        self.params = params;
        Ok(())
    }

    /// Examples the mean is over (0 for data-free problems).
    pub fn examples(&self) -> usize {
        self.chunks.iter().map(|c| c.examples).sum()
    }

    /// Graph runs so far (each HVP is one run per chunk).
    pub fn graph_runs(&self) -> usize {
        self.graph_runs
    }

    fn split(&self, v: &[f64]) -> Vec<HostTensor> {
        let mut off = 0;
        self.io
            .shapes
            .iter()
            .map(|s| {
                let k: usize = s.iter().product();
                let data = v[off..off + k].iter().map(|&x| x as f32).collect();
                off += k;
                HostTensor::F32(ArrayD::from_shape_vec(IxDyn(s), data).expect("shape"))
            })
            .collect()
    }

    /// Loss, gradient and `H v` (flattened), each the weighted mean over
    /// the chunks.
    pub fn evaluate(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        if self.params.is_empty() && !self.io.params.is_empty() {
            bail!("HvpOperator: parameters not set");
        }
        ensure!(
            v.len() == self.n,
            "direction of length {} for {} parameters",
            v.len(),
            self.n
        );
        let vt = self.split(v);
        let total = self.examples();
        let nchunks = self.chunks.len();
        let (mut loss, mut grad, mut hv) = (0.0, vec![0.0; self.n], vec![0.0; self.n]);
        for c in &self.chunks {
            let w = if total == 0 {
                1.0 / nchunks as f64
            } else {
                c.examples as f64 / total as f64
            };
            let wanted = &self.wanted[c.session];
            let mut feed: Vec<(&str, &HostTensor)> = vec![];
            for (names, vals) in [(&self.io.params, &self.params), (&self.io.v, &vt)] {
                for (n, t) in names.iter().zip(vals) {
                    if wanted.contains(n) {
                        feed.push((n, t));
                    }
                }
            }
            feed.extend(self.io.batch.iter().map(String::as_str).zip(&c.batch));
            let outs = self.sessions[c.session].run(&feed).context("HVP graph")?;
            self.graph_runs += 1;
            let get = |name: &str| -> Result<&HostTensor> {
                outs.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .with_context(|| format!("the HVP graph has no output '{name}'"))
            };
            loss += w * get(&self.io.loss)?.to_scalar_f32()? as f64;
            for (names, acc) in [(&self.io.grad, &mut grad), (&self.io.hv, &mut hv)] {
                let mut off = 0;
                for n in names {
                    let t = get(n)?.as_f32()?;
                    for (a, &x) in acc[off..off + t.len()].iter_mut().zip(t.iter()) {
                        *a += w * x as f64;
                    }
                    off += t.len();
                }
            }
        }
        Ok((loss, grad, hv))
    }

    /// Loss and gradient norm at the parameters.
    pub fn loss_and_grad_norm(&mut self) -> Result<(f64, f64)> {
        let (l, g, _) = self.evaluate(&vec![0.0; self.n])?;
        Ok((l, super::norm(&g)))
    }
}

impl Operator for HvpOperator {
    fn dim(&self) -> usize {
        self.n
    }
    fn apply(&mut self, v: &[f64]) -> Result<Vec<f64>> {
        Ok(self.evaluate(v)?.2)
    }
}
