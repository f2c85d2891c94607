//! How a bundle says to draw fresh initial values: one [`TensorInit`] per
//! tensor, a named rule over a seeded random stream ([`SeededRng`]).
//!
//! The compiler's problems and optimizers describe their initialisation
//! with these rules and draw their own initial values through
//! [`TensorInit::draw`], and a bundle carries the same rules (for L2O in
//! `meta.l2o.init`), so the runtime draws exactly the values the compiler
//! would, bit for bit, without the compiler.
//!
//! **Determinism**: a rule draws from a ChaCha8 stream seeded with the
//! init seed, on the stream number the rule names (a problem uses the
//! parameter index, so one parameter's values do not depend on the
//! others' shapes); normals come from Box-Muller, one per pair of
//! uniforms. The values are the same on every platform and run.

use anyhow::{ensure, Result};
use metac_graphs::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A deterministic random stream: ChaCha8 seeded with `seed`, on stream
/// `stream` (use the parameter index, so that parameters are independent).
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream);
        SeededRng(r)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// Uniform in `[lo, hi)` (`lo < hi`).
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        self.0.random_range(lo..hi)
    }

    /// Standard normal (Box-Muller, one draw per pair of uniforms).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }
}

/// How one f32 tensor's initial value is drawn from a seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum InitRule {
    /// Every element `value` (no randomness).
    Constant { value: f32 },
    /// `(std * z) as f32` per element, `z` standard normal from stream
    /// `stream` (fan-in normal weights: `std = 1.2 / sqrt(fan_in)`).
    Normal { std: f64, stream: u64 },
    /// `point[i] + (std * z_i) as f32`: a fixed starting point with normal
    /// noise, from stream `stream` (the 2-D test functions).
    NormalAround {
        point: Vec<f32>,
        std: f64,
        stream: u64,
    },
    /// Elements in `segments` consecutive runs (the HierarchicalRNN's
    /// per-element log learning rates, tensor by tensor): run `k` draws
    /// from stream `k` an offset `o ~ U[lo, hi)`, then each element is
    /// `clamp(U[lo, hi) + o, min, max)`; with `lo == hi` every draw is `lo`.
    SegmentedUniform {
        lo: f64,
        hi: f64,
        min: f64,
        max: f64,
        segments: Vec<usize>,
    },
}

/// A named f32 tensor and the rule its initial value is drawn by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorInit {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(flatten)]
    pub rule: InitRule,
}

impl TensorInit {
    pub fn new(name: &str, shape: &[usize], rule: InitRule) -> Self {
        TensorInit {
            name: name.into(),
            shape: shape.to_vec(),
            rule,
        }
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rule's sizes agree with the shape (what a bundle from elsewhere
    /// must be checked for before [`TensorInit::draw`]).
    pub fn check(&self) -> Result<()> {
        let n = self.len();
        match &self.rule {
            InitRule::NormalAround { point, .. } => ensure!(
                point.len() == n,
                "initial value of '{}': {} points for {n} elements",
                self.name,
                point.len()
            ),
            InitRule::SegmentedUniform {
                lo, hi, segments, ..
            } => {
                ensure!(
                    segments.iter().sum::<usize>() == n,
                    "initial value of '{}': segments {segments:?} do not cover its {n} elements",
                    self.name
                );
                ensure!(
                    lo <= hi,
                    "initial value of '{}': empty range [{lo}, {hi})",
                    self.name
                );
            }
            InitRule::Constant { .. } | InitRule::Normal { .. } => {}
        }
        Ok(())
    }

    /// The initial value for `seed`.
    ///
    /// # Panics
    /// When the rule disagrees with the shape (see [`TensorInit::check`]).
    pub fn draw(&self, seed: u64) -> Tensor {
        let n = self.len();
        let data = match &self.rule {
            InitRule::Constant { value } => vec![*value; n],
            InitRule::Normal { std, stream } => {
                let mut rng = SeededRng::new(seed, *stream);
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
            InitRule::NormalAround { point, std, stream } => {
                assert_eq!(point.len(), n, "{}: point of another size", self.name);
                let mut rng = SeededRng::new(seed, *stream);
                point
                    .iter()
                    .map(|&p| p + (std * rng.normal()) as f32)
                    .collect()
            }
            InitRule::SegmentedUniform {
                lo,
                hi,
                min,
                max,
                segments,
            } => {
                let mut vals = Vec::with_capacity(n);
                for (k, &len) in segments.iter().enumerate() {
                    let mut rng = SeededRng::new(seed, k as u64);
                    let mut draw = || {
                        if lo < hi {
                            rng.uniform_in(*lo, *hi)
                        } else {
                            *lo
                        }
                    };
                    let offset = draw();
                    vals.extend((0..len).map(|_| (draw() + offset).clamp(*min, *max) as f32));
                }
                assert_eq!(vals.len(), n, "{}: segments of another size", self.name);
                vals
            }
        };
        Tensor::f32(&self.shape, data)
    }
}

/// Draw every tensor of `inits` for `seed`, named.
pub fn draw_all(inits: &[TensorInit], seed: u64) -> Vec<(String, Tensor)> {
    inits
        .iter()
        .map(|i| (i.name.clone(), i.draw(seed)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_deterministic_and_streams_independent() {
        let a = TensorInit::new(
            "w",
            &[3, 4],
            InitRule::Normal {
                std: 0.5,
                stream: 1,
            },
        );
        assert_eq!(a.draw(7), a.draw(7));
        assert_ne!(a.draw(7), a.draw(8));
        let b = TensorInit::new(
            "v",
            &[12],
            InitRule::Normal {
                std: 0.5,
                stream: 2,
            },
        );
        assert_ne!(a.draw(7).as_f32().unwrap(), b.draw(7).as_f32().unwrap());
        // Stream 1 of seed 7, by hand.
        let mut rng = SeededRng::new(7, 1);
        let first = (rng.normal() * 0.5) as f32;
        assert_eq!(a.draw(7).as_f32().unwrap()[0], first);
    }

    #[test]
    fn segmented_uniform_stays_in_its_range() {
        let t = TensorInit::new(
            "lr",
            &[1, 7],
            InitRule::SegmentedUniform {
                lo: -3.0,
                hi: -1.0,
                min: -5.0,
                max: -2.5,
                segments: vec![3, 4],
            },
        );
        t.check().unwrap();
        let v = t.draw(3);
        assert!(v
            .as_f32()
            .unwrap()
            .iter()
            .all(|&x| (-5.0..=-2.5).contains(&x)));
        let bad = TensorInit {
            shape: vec![1, 8],
            ..t
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn rules_round_trip_through_json() {
        let t = TensorInit::new(
            "x",
            &[2],
            InitRule::NormalAround {
                point: vec![-1.2, 1.0],
                std: 0.1,
                stream: 0,
            },
        );
        let j = serde_json::to_value(&t).unwrap();
        assert_eq!(j["rule"], "normal-around");
        let back: TensorInit = serde_json::from_value(j).unwrap();
        assert_eq!(back, t);
    }
}
