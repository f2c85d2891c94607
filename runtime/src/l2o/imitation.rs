//! Imitation of Adam (the L2O-Entropy seed, section 5.2): in a share
//! `mt_ratio` of the meta-iterations, the bundle's compiled Adam step
//! (`imitation_step`) runs from the same initial parameters over the same
//! minibatches as the learned optimizer, and its parameter updates are the
//! labels of an MSE term of the meta-loss:
//! `weight * mean_t 0.5 * |Delta_t - Delta_adam_t|^2 / num_params`, with
//! `Delta_t = theta_t+1 - theta_t` the learned optimizer's update at step `t`.
//!
//! **Choices:** Adam follows its own trajectory (its labels do not depend on
//! the learned optimizer); with `mt_k > 1` a label is Adam's update over
//! `mt_k` steps on the step's minibatch. The MSE and its adjoint (with
//! respect to `theta_t+1` and `theta_t`) are elementwise host arithmetic in
//! [`super::bptt`]; the labels are constants.

use std::collections::HashMap;

use anyhow::{Context, Result};
use ndarray::{ArrayD, IxDyn};

use super::bptt::{Minibatches, Named};
use super::ImitationSpec;
use crate::backend::Session;
use crate::tensor::HostTensor;

/// Adam on its own trajectory, producing one label per inner step.
pub struct AdamTeacher<'a> {
    spec: &'a ImitationSpec,
    session: &'a mut dyn Session,
    /// Parameters by layout theta name.
    theta: Named<HostTensor>,
    state: Vec<HostTensor>,
}

impl<'a> AdamTeacher<'a> {
    /// Adam from `theta0` (layout names) with zero moments.
    pub fn new(
        spec: &'a ImitationSpec,
        session: &'a mut dyn Session,
        theta0: &Named<HostTensor>,
    ) -> Self {
        let state = spec
            .state
            .iter()
            .map(|(_, s)| HostTensor::F32(ArrayD::zeros(IxDyn(s))))
            .collect();
        AdamTeacher {
            spec,
            session,
            theta: theta0.clone(),
            state,
        }
    }

    /// Weight of the MSE term in the meta-loss.
    pub fn weight(&self) -> f64 {
        self.spec.weight
    }

    /// The labels of a run of minibatches (layout `batch.*` names): Adam's
    /// update per minibatch, by layout theta name.
    pub fn labels(
        &mut self,
        minibatches: &dyn Minibatches<HostTensor>,
    ) -> Result<Vec<Named<HostTensor>>> {
        let mut out = vec![];
        for t in 0..minibatches.len() {
            let mb = minibatches.get(t)?;
            let before = self.theta.clone();
            for _ in 0..self.spec.mt_k {
                self.step(&mb)?;
            }
            let label = self
                .theta
                .iter()
                .zip(&before)
                .map(|((n, a), (_, b))| Ok((n.clone(), HostTensor::F32(a.as_f32()? - b.as_f32()?))))
                .collect::<Result<_>>()?;
            out.push(label);
        }
        Ok(out)
    }

    fn step(&mut self, mb: &Named<HostTensor>) -> Result<()> {
        let theta: HashMap<&str, &HostTensor> =
            self.theta.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let batch: HashMap<&str, &HostTensor> = mb.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut ins: Vec<(&str, &HostTensor)> = vec![];
        for (input, layout) in &self.spec.params {
            let t = theta
                .get(layout.as_str())
                .with_context(|| format!("imitation: no parameter '{layout}'"))?;
            ins.push((input.as_str(), t));
        }
        for (input, layout) in &self.spec.batch {
            let t = batch
                .get(layout.as_str())
                .with_context(|| format!("imitation: no minibatch input '{layout}'"))?;
            ins.push((input.as_str(), t));
        }
        for ((n, _), t) in self.spec.state.iter().zip(&self.state) {
            ins.push((n.as_str(), t));
        }
        let out: HashMap<String, HostTensor> = self.session.run(&ins)?.into_iter().collect();
        let get = |n: &str| {
            out.get(n)
                .cloned()
                .with_context(|| format!("graph '{}' has no output '{n}'", self.spec.graph))
        };
        for ((_, t), n) in self.theta.iter_mut().zip(&self.spec.new_params) {
            *t = get(n)?;
        }
        for (t, n) in self.state.iter_mut().zip(&self.spec.new_state) {
            *t = get(n)?;
        }
        Ok(())
    }
}
