//! The run-time side of the Hessian regularisers (L2O-Entropy): which
//! unrolls are regularised and with what weight ([`RegularizerSchedule`]),
//! and the probe vectors the compiled step reads, drawn fresh for every
//! inner step from the run's seeded generator ([`ProbeGenerator`]).
//!
//! The compiled `step` outputs `reg`, the regulariser at `theta_t`; the
//! meta-loss of an unroll adds `weight * sum_t reg_t`, and the backward pass
//! feeds `ct.reg = weight` to `step_vjp` (with the same probes as the
//! forward step), which differentiates the regulariser into `theta_t` and
//! from there, through the earlier steps, into the optimizer's weights.

use ndarray::{ArrayD, IxDyn};

use super::{ProbeKind, RegularizerSchedule};
use crate::rng::SplitMix64;
use crate::tensor::HostTensor;
use crate::tensor::Named;

/// Draws the probes of each inner step, deterministically in its seed.
pub struct ProbeGenerator {
    rng: SplitMix64,
}

impl ProbeGenerator {
    pub fn new(seed: u64) -> Self {
        ProbeGenerator {
            rng: SplitMix64::new(seed),
        }
    }

    fn uniform(&mut self) -> f64 {
        // 53 random bits in [0, 1).
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn entry(&mut self, kind: ProbeKind) -> f32 {
        match kind {
            ProbeKind::Rademacher => {
                if self.rng.next_u64() >> 63 == 0 {
                    1.0
                } else {
                    -1.0
                }
            }
            ProbeKind::Normal => {
                // Box-Muller, one of the pair.
                let u1 = 1.0 - self.uniform();
                let u2 = self.uniform();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            }
        }
    }

    /// Fresh probes for one step.
    pub fn draw(&mut self, s: &RegularizerSchedule) -> Named<HostTensor> {
        s.probes
            .iter()
            .map(|p| {
                let n: usize = p.shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| self.entry(s.probe_kind)).collect();
                let a = ArrayD::from_shape_vec(IxDyn(&p.shape), v).expect("probe shape");
                (p.name.clone(), HostTensor::F32(a))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2o::{ProbeInput, RegularizeTime};

    fn schedule(time: RegularizeTime, kind: ProbeKind) -> RegularizerSchedule {
        RegularizerSchedule {
            option: "hessian".into(),
            alpha: 0.5,
            time,
            posterior_scale: 0.5,
            probe_kind: kind,
            probes: vec![ProbeInput {
                name: "reg.probe.theta.w".into(),
                shape: vec![3, 2, 2],
            }],
        }
    }

    #[test]
    fn weights_follow_regularize_time() {
        let s = schedule(RegularizeTime::Posterior, ProbeKind::Rademacher);
        // 5 unrolls: int(0.5 * 5 + 1) = 3, so only unroll 4.
        let w: Vec<f64> = (0..5).map(|u| s.weight(u, 5)).collect();
        assert_eq!(w, [0.0, 0.0, 0.0, 0.0, 0.5]);
        let s = schedule(RegularizeTime::All, ProbeKind::Rademacher);
        assert!((0..5).all(|u| s.weight(u, 5) == 0.5));
        let s = schedule(RegularizeTime::None, ProbeKind::Rademacher);
        assert!((0..5).all(|u| s.weight(u, 5) == 0.0));
    }

    #[test]
    fn probes_are_deterministic_and_distributed_as_asked() {
        let s = schedule(RegularizeTime::All, ProbeKind::Rademacher);
        let a = ProbeGenerator::new(7).draw(&s);
        let b = ProbeGenerator::new(7).draw(&s);
        assert_eq!(a, b);
        let v = a[0].1.as_f32().unwrap();
        assert_eq!(v.shape(), [3, 2, 2]);
        assert!(v.iter().all(|&x| x == 1.0 || x == -1.0));
        let s = schedule(RegularizeTime::All, ProbeKind::Normal);
        let mut gen = ProbeGenerator::new(1);
        let xs: Vec<f64> = (0..2000)
            .flat_map(|_| {
                gen.draw(&s)[0]
                    .1
                    .as_f32()
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect::<Vec<_>>()
            })
            .collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            m.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {m}, var {var}"
        );
    }
}
