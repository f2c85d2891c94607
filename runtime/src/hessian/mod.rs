//! Hessian spectra of a loss at given parameters (`metac hessian`).
//!
//! The Hessian is never formed: every algorithm here sees it only through
//! Hessian-vector products ([`Operator`]), which for a problem are runs of a
//! compiled HVP graph ([`HvpOperator`]: inputs the parameters, a data chunk
//! and a direction `v.<param>`, outputs `loss`, `grad.<param>` and
//! `hv.<param>`). The loops run on the host in f64 over the flattened
//! parameter vector (the parameters in problem order, each row-major); the
//! graph computes in f32.
//!
//! * **Trace**: Hutchinson's estimator with Rademacher probes
//!   ([`hutchinson`]).
//! * **Top eigenvalues**: the largest Ritz values of a Lanczos run with full
//!   reorthogonalisation ([`top_eigenvalues`]), with their residual norms.
//! * **Spectral density**: stochastic Lanczos quadrature ([`slq`]): Lanczos
//!   runs from random unit vectors; each tridiagonal matrix is
//!   eigen-decomposed ([`tridiag_eigen`], implicit QL) into nodes (Ritz
//!   values) and weights (squared first eigenvector components); the density
//!   is the mean over runs of `sum_j w_j N(t; theta_j, sigma^2)` on a grid
//!   ([`density`]).
//!
//! Randomness ([`Probes`]) is SplitMix64 from the user's seed: the same
//! seed gives the same probes and start vectors everywhere.

mod estimators;
mod graph;
mod lanczos;
mod tridiag;

pub use estimators::{density, hutchinson, integral, slq, Density, SlqRun, TraceEstimate};
pub use graph::{Chunk, HvpOperator};
pub use lanczos::{lanczos, top_eigenvalues, Lanczos, TopEigen};
pub use metac_contract::io::HvpIo;
pub use tridiag::{symmetric_eigenvalues, tridiag_eigen, TridiagEigen};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::rng::SplitMix64;

/// A symmetric linear operator on `R^n`: the Hessian, seen through
/// Hessian-vector products.
pub trait Operator {
    fn dim(&self) -> usize;
    /// `H v`.
    fn apply(&mut self, v: &[f64]) -> Result<Vec<f64>>;
}

/// A dense symmetric matrix as an [`Operator`] (tests, small problems).
#[derive(Clone, Debug)]
pub struct DenseOperator {
    pub n: usize,
    /// Row-major `n x n`.
    pub a: Vec<f64>,
}

impl DenseOperator {
    pub fn new(n: usize, a: Vec<f64>) -> Self {
        assert_eq!(a.len(), n * n, "DenseOperator: not n x n");
        DenseOperator { n, a }
    }
    pub fn diagonal(d: &[f64]) -> Self {
        let n = d.len();
        let mut a = vec![0.0; n * n];
        for (i, &x) in d.iter().enumerate() {
            a[i * n + i] = x;
        }
        DenseOperator { n, a }
    }
}

impl Operator for DenseOperator {
    fn dim(&self) -> usize {
        self.n
    }
    fn apply(&mut self, v: &[f64]) -> Result<Vec<f64>> {
        if v.len() != self.n {
            bail!("vector of length {} for a {0}x{0} matrix", self.n);
        }
        Ok(self.a.chunks(self.n).map(|row| dot(row, v)).collect())
    }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// The random vectors of the estimators: SplitMix64 from a seed.
#[derive(Clone, Debug)]
pub struct Probes(SplitMix64);

impl Probes {
    pub fn new(seed: u64) -> Self {
        Probes(SplitMix64::new(seed))
    }
    /// Uniform in `[0, 1)` (53 bits).
    fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Entries +-1 with probability 1/2 each.
    pub fn rademacher(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                if self.0.next_u64() >> 63 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// A uniformly random unit vector (a normalised Gaussian one).
    pub fn unit(&mut self, n: usize) -> Vec<f64> {
        loop {
            let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
            let s = norm(&v);
            if s > 0.0 {
                return v.into_iter().map(|x| x / s).collect();
            }
        }
    }
}

/// What [`analyze`] computes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Hutchinson probes.
    pub probes: usize,
    /// Number of top eigenvalues.
    pub top: usize,
    /// Lanczos steps, for the top eigenvalues and each SLQ run (capped at
    /// the number of parameters).
    pub lanczos_steps: usize,
    /// SLQ runs.
    pub slq_runs: usize,
    /// Density kernel width relative to the spectrum's width.
    pub sigma: f64,
    /// Density grid points.
    pub grid_points: usize,
    /// Seed of the probes and start vectors.
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            probes: 100,
            top: 5,
            lanczos_steps: 50,
            slq_runs: 10,
            sigma: 1e-2,
            grid_points: 1000,
            seed: 0,
        }
    }
}

/// Everything [`analyze`] finds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    pub trace: TraceEstimate,
    pub top: TopEigen,
    pub slq: Vec<SlqRun>,
    pub density: Density,
    /// Hessian-vector products computed.
    pub hvps: usize,
}

/// Counts the products an operator computes.
struct Counted<'a> {
    op: &'a mut dyn Operator,
    calls: usize,
}

impl Operator for Counted<'_> {
    fn dim(&self) -> usize {
        self.op.dim()
    }
    fn apply(&mut self, v: &[f64]) -> Result<Vec<f64>> {
        self.calls += 1;
        self.op.apply(v)
    }
}

/// Trace, top eigenvalues and spectral density of `op`; `progress` is
/// called with a short note before each stage.
pub fn analyze(
    op: &mut dyn Operator,
    s: &Settings,
    progress: &mut dyn FnMut(&str),
) -> Result<Analysis> {
    if s.top == 0 {
        bail!("--top must be at least 1");
    }
    if s.lanczos_steps == 0 {
        bail!("--lanczos-steps must be at least 1");
    }
    let mut op = Counted { op, calls: 0 };
    let n = op.dim();
    if n == 0 {
        bail!("the problem has no parameters");
    }
    let mut rng = Probes::new(s.seed);
    progress(&format!("trace: {} Hutchinson probes", s.probes));
    let trace = hutchinson(&mut op, s.probes, &mut rng)?;
    let steps = s.lanczos_steps.min(n);
    progress(&format!("top {} eigenvalues: {steps} Lanczos steps", s.top));
    let start = rng.unit(n);
    let top = top_eigenvalues(&mut op, &start, s.top, steps)?;
    progress(&format!(
        "density: {} SLQ runs of {steps} steps",
        s.slq_runs
    ));
    let runs = slq(&mut op, s.slq_runs, steps, &mut rng)?;
    let density = density(&runs, s.sigma, s.grid_points)?;
    Ok(Analysis {
        trace,
        top,
        slq: runs,
        density,
        hvps: op.calls,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A dense `n x n` symmetric matrix `Q diag(spec) Q^T` with a random
    /// orthogonal `Q` (a product of Householder reflections) and a spectrum
    /// with a bulk in `[-1, 2]` and three outliers `10, 20, 40`; returns the
    /// spectrum ascending.
    pub fn known_spectrum(n: usize, seed: u64) -> (DenseOperator, Vec<f64>) {
        let mut rng = Probes::new(seed);
        let mut spec: Vec<f64> = (0..n).map(|i| -1.0 + 3.0 * i as f64 / n as f64).collect();
        let k = spec.len();
        for (i, &o) in [10.0, 20.0, 40.0].iter().enumerate().take(n) {
            spec[k - 1 - i] = o;
        }
        spec.sort_by(f64::total_cmp);
        // Columns of Q: H_1 H_2 ... H_4 e_j.
        let mut q: Vec<Vec<f64>> = (0..n)
            .map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect())
            .collect();
        for _ in 0..4 {
            let u = rng.unit(n);
            for col in q.iter_mut() {
                let c = 2.0 * dot(&u, col);
                for (x, ui) in col.iter_mut().zip(&u) {
                    *x -= c * ui;
                }
            }
        }
        let mut a = vec![0.0; n * n];
        for (l, col) in spec.iter().zip(&q) {
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] += l * col[i] * col[j];
                }
            }
        }
        (DenseOperator::new(n, a), spec)
    }

    #[test]
    fn known_spectrum_is_what_it_says() {
        let (op, spec) = known_spectrum(8, 1);
        let ev = symmetric_eigenvalues(&op.a, 8);
        for (x, y) in ev.iter().zip(&spec) {
            assert!((x - y).abs() < 1e-10);
        }
    }

    #[test]
    fn probes_are_deterministic_and_balanced() {
        let a = Probes::new(7).rademacher(1000);
        assert_eq!(a, Probes::new(7).rademacher(1000));
        let s: f64 = a.iter().sum();
        assert!(s.abs() < 150.0);
        let u = Probes::new(1).unit(10);
        assert!((norm(&u) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn analyze_on_a_known_spectrum() {
        let (mut op, spec) = known_spectrum(40, 9);
        let s = Settings {
            probes: 50,
            top: 3,
            lanczos_steps: 40,
            slq_runs: 4,
            ..Settings::default()
        };
        let a = analyze(&mut op, &s, &mut |_| {}).unwrap();
        assert_eq!(a.hvps, 50 + 40 + 4 * 40);
        for (v, w) in a.top.values.iter().zip([40.0, 20.0, 10.0]) {
            assert!((v - w).abs() < 1e-8);
        }
        assert!((a.top.min_value - spec[0]).abs() < 1e-8);
        assert!((integral(&a.density) - 1.0).abs() < 1e-3);
    }
}
