//! The Lanczos process with full reorthogonalisation, and the top
//! eigenvalues of a symmetric operator from its Ritz values.

use anyhow::{bail, Result};
use serde::Serialize;

use super::tridiag::{tridiag_eigen, TridiagEigen};
use super::{dot, norm, Operator};

/// The tridiagonal matrix `T = Q^T H Q` of `steps` Lanczos steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Lanczos {
    /// Diagonal of `T` (one entry per step taken).
    pub alpha: Vec<f64>,
    /// Off-diagonal of `T` (`alpha.len() - 1` entries).
    pub beta: Vec<f64>,
    /// The norm of the residual after the last step (`beta_m`): Ritz pair
    /// `(theta_i, y_i)` has residual `||H Q y_i - theta_i Q y_i|| = beta_m |y_i[m-1]|`.
    pub residual: f64,
}

impl Lanczos {
    /// Eigen-decomposition of `T`.
    pub fn eigen(&self) -> Result<TridiagEigen> {
        tridiag_eigen(&self.alpha, &self.beta)
    }
}

/// Runs up to `steps` Lanczos steps of `op` from `start` (any non-zero
/// vector; it is normalised), reorthogonalising every new vector against
/// all previous ones (classical Gram-Schmidt, twice), so the Ritz values do
/// not repeat as in the plain three-term recurrence. Stops early when the
/// Krylov space is exhausted (the residual falls below `1e-12` times the
/// largest entry of `T`). Keeps all Lanczos vectors: memory `steps * n` f64.
pub fn lanczos(op: &mut dyn Operator, start: &[f64], steps: usize) -> Result<Lanczos> {
    let n = op.dim();
    if start.len() != n {
        bail!(
            "lanczos: start vector of length {} for dimension {n}",
            start.len()
        );
    }
    let s = norm(start);
    if s == 0.0 || !s.is_finite() {
        bail!("lanczos: the start vector is zero or not finite");
    }
    let steps = steps.min(n);
    let mut q: Vec<Vec<f64>> = vec![start.iter().map(|x| x / s).collect()];
    let (mut alpha, mut beta) = (vec![], vec![]);
    let mut scale: f64 = 0.0;
    let mut residual = 0.0;
    for j in 0..steps {
        let mut w = op.apply(&q[j])?;
        if w.iter().any(|x| !x.is_finite()) {
            bail!(
                "the Hessian-vector product is not finite (Lanczos step {})",
                j + 1
            );
        }
        let a = dot(&w, &q[j]);
        alpha.push(a);
        for (wi, qi) in w.iter_mut().zip(&q[j]) {
            *wi -= a * qi;
        }
        if j > 0 {
            let b: f64 = beta[j - 1];
            for (wi, qi) in w.iter_mut().zip(&q[j - 1]) {
                *wi -= b * qi;
            }
        }
        for _ in 0..2 {
            for qi in &q {
                let c = dot(&w, qi);
                for (wk, qk) in w.iter_mut().zip(qi) {
                    *wk -= c * qk;
                }
            }
        }
        let b = norm(&w);
        scale = scale.max(a.abs()).max(b);
        residual = b;
        if j + 1 == steps || b <= 1e-12 * scale {
            break;
        }
        beta.push(b);
        q.push(w.iter().map(|x| x / b).collect());
    }
    Ok(Lanczos {
        alpha,
        beta,
        residual,
    })
}

/// The largest eigenvalues of an operator as Lanczos Ritz values.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopEigen {
    /// The `k` largest Ritz values, descending.
    pub values: Vec<f64>,
    /// Their Lanczos residual estimates `beta_m |y_m|` (`= ||H u - theta u||`
    /// for the Ritz vector `u` in exact arithmetic): a bound on the distance
    /// from each value to an eigenvalue of the operator as applied. It does
    /// not include the operator's own rounding (f32 HVPs: about `1e-6` of
    /// the largest eigenvalue).
    pub residuals: Vec<f64>,
    /// The smallest Ritz value (an estimate of the most negative eigenvalue).
    pub min_value: f64,
    /// Lanczos steps taken.
    pub steps: usize,
}

/// The `k` largest Ritz values of `steps` Lanczos steps from `start`.
pub fn top_eigenvalues(
    op: &mut dyn Operator,
    start: &[f64],
    k: usize,
    steps: usize,
) -> Result<TopEigen> {
    let l = lanczos(op, start, steps)?;
    let e = l.eigen()?;
    let last = e.last();
    let m = e.values.len();
    let idx: Vec<usize> = (0..m).rev().take(k).collect();
    Ok(TopEigen {
        values: idx.iter().map(|&i| e.values[i]).collect(),
        residuals: idx.iter().map(|&i| l.residual * last[i].abs()).collect(),
        min_value: e.values[0],
        steps: m,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::known_spectrum;
    use super::*;

    #[test]
    fn full_lanczos_recovers_the_spectrum() {
        let (mut op, spec) = known_spectrum(30, 1);
        let start: Vec<f64> = (0..30).map(|i| 1.0 + (i as f64).sin()).collect();
        let l = lanczos(&mut op, &start, 30).unwrap();
        let e = l.eigen().unwrap();
        assert_eq!(e.values.len(), 30);
        for (x, y) in e.values.iter().zip(&spec) {
            assert!((x - y).abs() < 1e-8, "{x} vs {y}");
        }
    }

    #[test]
    fn top_eigenvalues_converge_in_few_steps() {
        let (mut op, spec) = known_spectrum(200, 2);
        let start: Vec<f64> = (0..200).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
        let t = top_eigenvalues(&mut op, &start, 3, 60).unwrap();
        assert_eq!(t.steps, 60);
        for (i, v) in t.values.iter().enumerate() {
            let want = spec[199 - i];
            assert!((v - want).abs() < 1e-6 * want.abs(), "{v} vs {want}");
            assert!(t.residuals[i] < 1e-3, "{:?}", t.residuals);
        }
        assert!(t.min_value >= spec[0] - 1e-9);
    }

    #[test]
    fn exhausted_krylov_space_stops_early() {
        // Diagonal with 3 distinct eigenvalues: the Krylov space has dim 3.
        let mut op = super::super::DenseOperator::diagonal(&[1.0, 1.0, 2.0, 2.0, 5.0, 5.0]);
        let l = lanczos(&mut op, &[1.0; 6], 6).unwrap();
        assert_eq!(l.alpha.len(), 3);
        let e = l.eigen().unwrap();
        for (x, y) in e.values.iter().zip(&[1.0, 2.0, 5.0]) {
            assert!((x - y).abs() < 1e-12);
        }
        assert!(lanczos(&mut op, &[0.0; 6], 3).is_err());
        assert!(lanczos(&mut op, &[1.0; 5], 3).is_err());
    }
}
