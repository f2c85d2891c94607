//! One meta-iteration of L2O meta-training: a problem run for
//! `num_unrolls` unrolls of `unroll_length` steps from its initial
//! parameters, truncated BPTT per unroll ([`truncated_bptt`]) and one
//! RMSProp update of the meta-parameters after each unroll. The optimizee
//! and optimizer state carry across unrolls; the hidden states are reset
//! in-graph on the first unroll; a non-finite objective ends the
//! meta-iteration after the update from the steps before it.

use anyhow::{ensure, Result};

use super::bptt::{truncated_bptt, Minibatches, Named, StepRunner, Unroll};
use super::imitation::AdamTeacher;
use super::meta_opt::MetaUpdate;
use super::regularizer::ProbeGenerator;
use super::L2oLayout;
use super::RegularizerSchedule;
use crate::tensor::HostTensor;

/// Where a meta-iteration's data come from (`'a`: the data they are made of).
pub trait UnrollData<'a> {
    /// The minibatch (`batch.*`) of inner step `step` (counted over the meta-iteration).
    fn minibatch(&mut self, step: usize) -> Result<Named<HostTensor>>;
    /// The objective set (`obj.*`) of unroll `unroll`.
    fn objective_batch(&mut self, unroll: usize) -> Result<Named<HostTensor>>;
    /// The minibatches of steps `first..first + count`, drawn now (in step
    /// order, as `minibatch` would draw them) and made when a step needs
    /// them. The default makes them all at once.
    fn minibatches(
        &mut self,
        first: usize,
        count: usize,
    ) -> Result<Box<dyn Minibatches<HostTensor> + 'a>> {
        let v: Vec<Named<HostTensor>> = (first..first + count)
            .map(|t| self.minibatch(t))
            .collect::<Result<_>>()?;
        Ok(Box::new(v))
    }
}

/// The `[run]` settings a meta-iteration uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnrollSchedule {
    pub unroll_length: usize,
    pub num_unrolls: usize,
    /// BPTT recompute checkpointing (see [`Unroll::checkpoint_every`]).
    pub checkpoint_every: usize,
}

/// What a meta-iteration did.
#[derive(Clone, Debug)]
pub struct MetaIterationReport {
    /// Meta-loss of each unroll run.
    pub meta_losses: Vec<f64>,
    /// Objective after every inner step run.
    pub objectives: Vec<f64>,
    /// Minibatch loss at every inner step run.
    pub minibatch_losses: Vec<f64>,
    /// The regulariser at every inner step run (empty without one).
    pub regs: Vec<f64>,
    /// The imitation MSE at every inner step run (empty unless imitating).
    pub imitation_mse: Vec<f64>,
    /// Stopped at a non-finite objective.
    pub diverged: bool,
    /// Optimizee parameters and optimizer state at the end.
    pub theta: Named<HostTensor>,
    pub state: Named<HostTensor>,
}

/// A bundle's regulariser and the generator of its probes.
pub struct Regularization<'a> {
    pub schedule: &'a RegularizerSchedule,
    pub probes: &'a mut ProbeGenerator,
}

/// Run one meta-iteration from `theta0`/`state0`, updating `phi` (in
/// `layout.phi` order) in place with `opt`. `initial_objective` is the
/// objective at `theta0` (the constant of the log meta-objective). With a
/// regulariser, each unroll's meta-loss adds its weight (per
/// `regularize_time`) times the sum of the regulariser over the steps. With
/// a teacher (an imitating meta-iteration), each unroll's meta-loss adds the
/// imitation MSE against the teacher's updates on the same minibatches.
#[allow(clippy::too_many_arguments)]
pub fn meta_iteration<'a, R: StepRunner<Tensor = HostTensor>>(
    runner: &mut R,
    layout: &L2oLayout,
    phi: &mut Named<HostTensor>,
    opt: &mut dyn MetaUpdate,
    theta0: Named<HostTensor>,
    state0: Named<HostTensor>,
    initial_objective: f64,
    schedule: UnrollSchedule,
    data: &mut dyn UnrollData<'a>,
    mut reg: Option<Regularization<'_>>,
    mut teacher: Option<&mut AdamTeacher<'_>>,
) -> Result<MetaIterationReport> {
    ensure!(
        schedule.unroll_length > 0 && schedule.num_unrolls > 0,
        "unroll_length and num_unrolls must be at least 1"
    );
    ensure!(
        phi.iter().map(|(n, _)| n).eq(layout.phi.iter()),
        "phi must be given in the layout's order"
    );
    let mut rep = MetaIterationReport {
        meta_losses: vec![],
        objectives: vec![],
        minibatch_losses: vec![],
        regs: vec![],
        imitation_mse: vec![],
        diverged: false,
        theta: theta0,
        state: state0,
    };
    for u in 0..schedule.num_unrolls {
        let minibatches = data.minibatches(u * schedule.unroll_length, schedule.unroll_length)?;
        let obj = data.objective_batch(u)?;
        let (probes, reg_weight) = match reg.as_mut() {
            Some(r) => (
                (0..schedule.unroll_length)
                    .map(|_| r.probes.draw(r.schedule))
                    .collect(),
                r.schedule.weight(u, schedule.num_unrolls),
            ),
            None => (vec![], 0.0),
        };
        let labels = match teacher.as_mut() {
            Some(t) => Some((t.labels(minibatches.as_ref())?, t.weight())),
            None => None,
        };
        let res = truncated_bptt(
            runner,
            layout,
            &Unroll {
                phi,
                theta: &rep.theta,
                state: &rep.state,
                reset: u == 0,
                minibatches: minibatches.as_ref(),
                objective_batch: &obj,
                initial_objective,
                probes: &probes,
                reg_weight,
                imitation: labels.as_ref().map(|(l, w)| (l.as_slice(), *w)),
                checkpoint_every: schedule.checkpoint_every,
            },
        )?;
        if !res.objectives.is_empty() {
            opt.update(phi, &res.d_phi)?;
            rep.meta_losses.push(res.meta_loss);
        }
        rep.objectives.extend(&res.objectives);
        rep.minibatch_losses.extend(&res.minibatch_losses);
        rep.regs.extend(&res.regs);
        rep.imitation_mse.extend(&res.imitation_mse);
        rep.theta = res.theta;
        rep.state = res.state;
        if res.diverged {
            rep.diverged = true;
            break;
        }
    }
    Ok(rep)
}
