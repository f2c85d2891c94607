//! Stochastic estimators: the trace by Hutchinson's method and the spectral
//! density by stochastic Lanczos quadrature (SLQ).

use anyhow::{bail, Result};
use serde::Serialize;

use super::lanczos::lanczos;
use super::{dot, Operator, Probes};

/// Hutchinson's trace estimate: the mean of `z^T H z` over Rademacher
/// probes `z`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceEstimate {
    pub mean: f64,
    /// Standard error of the mean (sample standard deviation over
    /// `sqrt(probes)`); `None` for a single probe.
    pub stderr: Option<f64>,
    pub probes: usize,
    /// `z^T H z` per probe.
    pub samples: Vec<f64>,
}

/// Estimates `tr(H)` from `probes` Rademacher vectors (entries +-1, so
/// `E[z^T H z] = tr(H)` with variance `2 sum_{i != j} H_ij^2`).
pub fn hutchinson(op: &mut dyn Operator, probes: usize, rng: &mut Probes) -> Result<TraceEstimate> {
    if probes == 0 {
        bail!("Hutchinson needs at least one probe");
    }
    let n = op.dim();
    let mut samples = Vec::with_capacity(probes);
    for _ in 0..probes {
        let z = rng.rademacher(n);
        let hz = op.apply(&z)?;
        let s = dot(&z, &hz);
        if !s.is_finite() {
            bail!("the Hessian-vector product is not finite (Hutchinson probe)");
        }
        samples.push(s);
    }
    let p = probes as f64;
    let mean = samples.iter().sum::<f64>() / p;
    let stderr = (probes > 1).then(|| {
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (p - 1.0);
        (var / p).sqrt()
    });
    Ok(TraceEstimate {
        mean,
        stderr,
        probes,
        samples,
    })
}

/// One SLQ run: the Gauss quadrature of the spectral measure seen from a
/// random unit vector `v`: `v^T f(H) v ~ sum_j weights[j] f(nodes[j])`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlqRun {
    /// Ritz values of the run's tridiagonal matrix, ascending.
    pub nodes: Vec<f64>,
    /// Squared first components of its eigenvectors (they sum to 1).
    pub weights: Vec<f64>,
}

/// `runs` Lanczos runs of `steps` steps from random unit vectors (Gaussian
/// directions), each eigen-decomposed into nodes and weights.
pub fn slq(
    op: &mut dyn Operator,
    runs: usize,
    steps: usize,
    rng: &mut Probes,
) -> Result<Vec<SlqRun>> {
    if runs == 0 || steps == 0 {
        bail!("SLQ needs at least one run of at least one step");
    }
    let n = op.dim();
    (0..runs)
        .map(|_| {
            let v = rng.unit(n);
            let e = lanczos(op, &v, steps)?.eigen()?;
            Ok(SlqRun {
                weights: e.first().iter().map(|x| x * x).collect(),
                nodes: e.values,
            })
        })
        .collect()
}

/// The smoothed spectral density on a grid.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Density {
    /// Grid points, ascending and evenly spaced.
    pub grid: Vec<f64>,
    /// Density at each grid point (integrates to about 1).
    pub density: Vec<f64>,
    /// The Gaussian kernel's standard deviation (absolute).
    pub sigma: f64,
    /// `sigma` relative to the width of the spectrum (`max node - min node`).
    pub sigma_relative: f64,
}

/// The density `phi(t) = mean over runs of sum_j w_j N(t; theta_j, sigma^2)`
/// on `points` evenly spaced points. `sigma = sigma_relative * width` with
/// `width = max node - min node` over all runs (or `max(1, |node|)` when all
/// nodes coincide); the grid covers `[min node - pad, max node + pad]` with
/// `pad = 5 sigma + width / 20`, so the Gaussians' tails are inside it.
pub fn density(runs: &[SlqRun], sigma_relative: f64, points: usize) -> Result<Density> {
    if !(sigma_relative > 0.0 && sigma_relative.is_finite()) {
        bail!("the density's sigma must be positive and finite, got {sigma_relative}");
    }
    if points < 2 {
        bail!("the density grid needs at least 2 points");
    }
    let all = || runs.iter().flat_map(|r| r.nodes.iter().copied());
    let lo = all().fold(f64::INFINITY, f64::min);
    let hi = all().fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        bail!("no finite SLQ nodes to build a density from");
    }
    let mut width = hi - lo;
    if width <= 1e-12 * hi.abs().max(lo.abs()).max(1.0) {
        width = hi.abs().max(1.0);
    }
    let sigma = sigma_relative * width;
    let pad = 5.0 * sigma + width / 20.0;
    let (a, b) = (lo - pad, hi + pad);
    let step = (b - a) / (points - 1) as f64;
    let grid: Vec<f64> = (0..points).map(|i| a + step * i as f64).collect();
    let norm = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt() * runs.len() as f64);
    let density = grid
        .iter()
        .map(|&t| {
            runs.iter()
                .flat_map(|r| r.nodes.iter().zip(&r.weights))
                .map(|(&th, &w)| w * (-0.5 * ((t - th) / sigma).powi(2)).exp())
                .sum::<f64>()
                * norm
        })
        .collect();
    Ok(Density {
        grid,
        density,
        sigma,
        sigma_relative,
    })
}

/// Trapezoid integral of the density over its grid.
pub fn integral(d: &Density) -> f64 {
    d.grid
        .windows(2)
        .zip(d.density.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::super::tests::known_spectrum;
    use super::super::DenseOperator;
    use super::*;

    #[test]
    fn hutchinson_is_exact_on_diagonal_matrices() {
        // z^T D z = tr(D) for every +-1 vector.
        let mut op = DenseOperator::diagonal(&[1.0, -2.0, 3.5, 10.0]);
        let t = hutchinson(&mut op, 5, &mut Probes::new(3)).unwrap();
        assert!((t.mean - 12.5).abs() < 1e-12);
        assert!(t.stderr.unwrap() < 1e-12);
        assert_eq!(t.samples.len(), 5);
        let t = hutchinson(&mut op, 1, &mut Probes::new(3)).unwrap();
        assert_eq!(t.stderr, None);
        assert!(hutchinson(&mut op, 0, &mut Probes::new(3)).is_err());
    }

    #[test]
    fn hutchinson_is_within_its_error_bars() {
        let (mut op, spec) = known_spectrum(50, 3);
        let tr: f64 = spec.iter().sum();
        let t = hutchinson(&mut op, 400, &mut Probes::new(11)).unwrap();
        let se = t.stderr.unwrap();
        assert!(
            (t.mean - tr).abs() < 4.0 * se,
            "{} vs {tr} (se {se})",
            t.mean
        );
    }

    #[test]
    fn slq_moments_and_density() {
        let (mut op, spec) = known_spectrum(60, 4);
        let n = spec.len() as f64;
        let runs = slq(&mut op, 20, 20, &mut Probes::new(5)).unwrap();
        assert_eq!(runs.len(), 20);
        for r in &runs {
            let w: f64 = r.weights.iter().sum();
            assert!((w - 1.0).abs() < 1e-10);
            assert!(r
                .nodes
                .iter()
                .all(|&t| t >= spec[0] - 1e-8 && t <= spec[59] + 1e-8));
        }
        // The quadrature's first moment estimates tr(H) / n.
        let m1: f64 = runs
            .iter()
            .map(|r| {
                r.nodes
                    .iter()
                    .zip(&r.weights)
                    .map(|(t, w)| t * w)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / runs.len() as f64;
        let mean = spec.iter().sum::<f64>() / n;
        let spread = (spec.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((m1 - mean).abs() < 0.5 * spread, "{m1} vs {mean}");
        let d = density(&runs, 1e-2, 2000).unwrap();
        assert!((integral(&d) - 1.0).abs() < 1e-3, "{}", integral(&d));
        assert!(d.grid[0] < spec[0] && *d.grid.last().unwrap() > spec[59]);
        assert!(density(&runs, 0.0, 10).is_err());
        assert!(density(&runs, 1e-2, 1).is_err());
    }

    #[test]
    fn density_of_a_single_point_mass() {
        let runs = vec![SlqRun {
            nodes: vec![3.0],
            weights: vec![1.0],
        }];
        let d = density(&runs, 0.05, 501).unwrap();
        assert!((d.sigma - 0.15).abs() < 1e-12);
        assert!((integral(&d) - 1.0).abs() < 1e-6);
        let peak = d
            .density
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert!((d.grid[peak] - 3.0).abs() < 0.01);
    }
}
