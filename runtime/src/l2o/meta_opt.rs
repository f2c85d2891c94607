//! The meta-optimizer: RMSProp on the learned optimizer's weights, as in
//! `metaopt.py` (TF1 `RMSPropOptimizer`, no momentum). Meta-training runs
//! the bundle's compiled form ([`CompiledMetaUpdate`], the `meta_update`
//! graph); [`RmsProp`] is the same update on the host, the reference the
//! compiled graph is tested against and the one the f64 tests use.
//!
//! Per element, with `g` the meta-gradient made finite (NaN -> 0, +-inf ->
//! +-clip) and clipped to `[-clip, clip]`:
//! `ms = decay * ms + (1 - decay) * g^2`, `phi -= lr * g / sqrt(ms + eps)`
//! (no change where `g = 0`).
//! TF1 starts the accumulator `ms` at 1 (`accumulator_init = 1`); the notes
//! found a zero-initialised accumulator with a larger rate to learn where the
//! TF1 form did not move, so the start value is a setting.

use anyhow::{ensure, Result};
use ndarray::ArrayD;

use super::RmsPropConfig;
use crate::tensor::HostTensor;

/// RMSProp state over a fixed list of f32 tensors.
pub struct RmsProp {
    pub config: RmsPropConfig,
    /// The mean-square accumulators, one per tensor.
    pub ms: Vec<ArrayD<f32>>,
}

/// Finite and clipped: NaN -> 0, then clamp to `[-clip, clip]` (which also
/// maps +-inf to +-clip).
pub fn sanitize(g: f32, clip: f32) -> f32 {
    if g.is_nan() {
        0.0
    } else {
        g.clamp(-clip, clip)
    }
}

impl RmsProp {
    /// Accumulators for tensors shaped like `params`.
    pub fn new(config: RmsPropConfig, params: &[(String, HostTensor)]) -> Self {
        let ms = params
            .iter()
            .map(|(_, t)| ArrayD::from_elem(t.shape(), config.accumulator_init as f32))
            .collect();
        RmsProp { config, ms }
    }

    /// One update of `params` by `grads` (same names, same order).
    pub fn update(
        &mut self,
        params: &mut [(String, HostTensor)],
        grads: &[(String, HostTensor)],
    ) -> Result<()> {
        check_counts("RMSProp", params, grads, &self.ms)?;
        let c = self.config;
        let (lr, decay, eps, clip) = (c.lr as f32, c.decay as f32, c.eps as f32, c.clip as f32);
        for (((pn, p), (gn, g)), ms) in params.iter_mut().zip(grads).zip(&mut self.ms) {
            ensure!(
                pn == gn,
                "RMSProp: parameter '{pn}' paired with gradient '{gn}'"
            );
            let g = g.as_f32()?;
            let HostTensor::F32(p) = p else {
                anyhow::bail!("RMSProp: parameter '{pn}' is not f32");
            };
            ensure!(
                p.shape() == g.shape() && p.shape() == ms.shape(),
                "RMSProp: '{pn}' has shape {:?}, its gradient {:?}",
                p.shape(),
                g.shape()
            );
            ndarray::Zip::from(p).and(g).and(ms).for_each(|p, &g, m| {
                let g = sanitize(g, clip);
                *m = decay * *m + (1.0 - decay) * g * g;
                // A zero gradient moves nothing (also where ms + eps is 0).
                if g != 0.0 {
                    *p -= lr * g / (*m + eps).sqrt();
                }
            });
        }
        Ok(())
    }
}

/// One gradient and one accumulator per parameter.
fn check_counts(
    what: &str,
    params: &[(String, HostTensor)],
    grads: &[(String, HostTensor)],
    ms: &[ArrayD<f32>],
) -> Result<()> {
    ensure!(
        params.len() == grads.len() && params.len() == ms.len(),
        "{what}: {} parameters, {} gradients, {} accumulators",
        params.len(),
        grads.len(),
        ms.len()
    );
    Ok(())
}

/// An update of the meta-parameters from their meta-gradient, holding its
/// per-parameter accumulators (checkpointed with the meta-parameters).
pub trait MetaUpdate {
    /// Update `params` in place from `grads` (same names and order).
    fn update(
        &mut self,
        params: &mut [(String, HostTensor)],
        grads: &[(String, HostTensor)],
    ) -> Result<()>;
    /// The accumulators, one per parameter.
    fn accumulators(&mut self) -> &mut Vec<ArrayD<f32>>;
}

impl MetaUpdate for RmsProp {
    fn update(
        &mut self,
        params: &mut [(String, HostTensor)],
        grads: &[(String, HostTensor)],
    ) -> Result<()> {
        RmsProp::update(self, params, grads)
    }
    fn accumulators(&mut self) -> &mut Vec<ArrayD<f32>> {
        &mut self.ms
    }
}

/// The bundle's compiled meta-optimizer (`meta_update`: RMSProp with the
/// same sanitising and clipping as [`RmsProp`]): inputs `<phi>`, `ms.<phi>`,
/// `d.<phi>`; outputs `next.<phi>`, `next.ms.<phi>`.
pub struct CompiledMetaUpdate {
    session: Box<dyn crate::backend::Session>,
    pub ms: Vec<ArrayD<f32>>,
}

impl CompiledMetaUpdate {
    /// `ms`: the initial accumulators, in the parameters' order.
    pub fn new(session: Box<dyn crate::backend::Session>, ms: Vec<ArrayD<f32>>) -> Self {
        CompiledMetaUpdate { session, ms }
    }
}

impl MetaUpdate for CompiledMetaUpdate {
    fn update(
        &mut self,
        params: &mut [(String, HostTensor)],
        grads: &[(String, HostTensor)],
    ) -> Result<()> {
        check_counts("meta_update", params, grads, &self.ms)?;
        let ms: Vec<(String, HostTensor)> = params
            .iter()
            .zip(&self.ms)
            .map(|((n, _), m)| (super::ms_name(n), HostTensor::F32(m.clone())))
            .collect();
        let d: Vec<(String, HostTensor)> = grads
            .iter()
            .map(|(n, g)| (super::d_name(n), g.clone()))
            .collect();
        let ins: Vec<(&str, &HostTensor)> = params
            .iter()
            .chain(&ms)
            .chain(&d)
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        let out: std::collections::HashMap<String, HostTensor> =
            self.session.run(&ins)?.into_iter().collect();
        let get = |n: &str| {
            out.get(n)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("graph 'meta_update' has no output '{n}'"))
        };
        for ((n, p), m) in params.iter_mut().zip(self.ms.iter_mut()) {
            *p = get(&super::next_name(n))?;
            *m = get(&super::next_name(&super::ms_name(n)))?.into_f32()?;
        }
        Ok(())
    }
    fn accumulators(&mut self) -> &mut Vec<ArrayD<f32>> {
        &mut self.ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn rmsprop_step_and_sanitising() {
        let cfg = RmsPropConfig {
            lr: 0.1,
            decay: 0.9,
            eps: 0.0,
            clip: 10.0,
            accumulator_init: 0.0,
        };
        let mut p = vec![(
            "w".to_string(),
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, 1.0, 1.0]).unwrap()),
        )];
        let g = vec![(
            "w".to_string(),
            HostTensor::F32(
                ArrayD::from_shape_vec(IxDyn(&[3]), vec![2.0, f32::NAN, f32::INFINITY]).unwrap(),
            ),
        )];
        let mut opt = RmsProp::new(cfg, &p);
        opt.update(&mut p, &g).unwrap();
        let w = p[0].1.as_f32().unwrap();
        // ms = 0.1 g^2, step = 0.1 * g / sqrt(0.1 g^2) = 0.1 / sqrt(0.1) * sign(g).
        let s = 0.1 / 0.1f32.sqrt();
        assert!((w[0] - (1.0 - s)).abs() < 1e-6, "{w:?}");
        assert!(w[1].is_finite() && (w[1] - 1.0).abs() < 1e-6, "{w:?}");
        assert!((w[2] - (1.0 - s)).abs() < 1e-6, "{w:?}");
        assert_eq!(opt.ms[0][1], 0.0);
        assert!((opt.ms[0][2] - 10.0).abs() < 1e-4);
    }
}
