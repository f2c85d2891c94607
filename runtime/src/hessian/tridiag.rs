//! Eigen-decomposition of symmetric tridiagonal matrices (implicit QL with
//! Wilkinson shifts, as in EISPACK's `tql2`), and a cyclic Jacobi solver for
//! small dense symmetric matrices (the exact reference in tests).

use anyhow::{bail, Result};

/// Eigenpairs of a symmetric tridiagonal matrix, eigenvalues ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct TridiagEigen {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// `vectors[i]`: the unit eigenvector of `values[i]`.
    pub vectors: Vec<Vec<f64>>,
}

impl TridiagEigen {
    /// First component of each eigenvector (the SLQ weights are their squares).
    pub fn first(&self) -> Vec<f64> {
        self.vectors.iter().map(|v| v[0]).collect()
    }
    /// Last component of each eigenvector (Lanczos residuals are `beta * |last|`).
    pub fn last(&self) -> Vec<f64> {
        self.vectors
            .iter()
            .map(|v| *v.last().expect("non-empty"))
            .collect()
    }
}

/// Eigenvalues and eigenvectors of the symmetric tridiagonal matrix with
/// diagonal `diag` (length n) and off-diagonal `off` (length n-1), by the
/// implicit QL algorithm. Errors after 60 iterations on one eigenvalue (not
/// seen for finite input) or on non-finite input.
pub fn tridiag_eigen(diag: &[f64], off: &[f64]) -> Result<TridiagEigen> {
    let n = diag.len();
    if n == 0 {
        return Ok(TridiagEigen {
            values: vec![],
            vectors: vec![],
        });
    }
    if off.len() + 1 != n {
        bail!(
            "tridiagonal matrix: {} diagonal and {} off-diagonal entries",
            n,
            off.len()
        );
    }
    if diag.iter().chain(off).any(|x| !x.is_finite()) {
        bail!("tridiagonal matrix has non-finite entries");
    }
    let mut d = diag.to_vec();
    let mut e = off.to_vec();
    e.push(0.0);
    // z[k][i]: component k of eigenvector i.
    let mut z: Vec<Vec<f64>> = (0..n)
        .map(|k| (0..n).map(|i| if i == k { 1.0 } else { 0.0 }).collect())
        .collect();
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                bail!("tridiagonal eigen-solver: no convergence for eigenvalue {l}");
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut i = m;
            let mut underflow = false;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                for row in z.iter_mut() {
                    let f = row[i + 1];
                    row[i + 1] = s * row[i] + c * f;
                    row[i] = c * row[i] - s * f;
                }
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
    Ok(TridiagEigen {
        values: order.iter().map(|&i| d[i]).collect(),
        vectors: order
            .iter()
            .map(|&i| z.iter().map(|row| row[i]).collect())
            .collect(),
    })
}

/// Eigenvalues (ascending) of the dense symmetric `n x n` matrix `a`
/// (row-major), by cyclic Jacobi rotations: O(n^3) per sweep, meant for
/// small matrices (exact spectra in tests, problems with a few hundred
/// parameters).
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n, "symmetric_eigenvalues: not n x n");
    let mut a = a.to_vec();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        let scale: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * scale.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut d: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    d.sort_by(f64::total_cmp);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(diag: &[f64], off: &[f64]) -> Vec<f64> {
        let n = diag.len();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = diag[i];
            if i + 1 < n {
                a[i * n + i + 1] = off[i];
                a[(i + 1) * n + i] = off[i];
            }
        }
        a
    }

    #[test]
    fn toeplitz_tridiagonal_has_cosine_spectrum() {
        // tridiag(-1, 2, -1): eigenvalues 2 - 2 cos(k pi / (n + 1)).
        let n = 12;
        let e = tridiag_eigen(&vec![2.0; n], &vec![-1.0; n - 1]).unwrap();
        for (k, &v) in e.values.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((v - want).abs() < 1e-12, "{v} vs {want}");
        }
    }

    #[test]
    fn eigenvectors_are_orthonormal_and_satisfy_the_equation() {
        let diag = [1.0, -3.0, 0.5, 7.0, 2.0, 2.0];
        let off = [0.3, 1.5, -2.0, 0.0, 4.0];
        let a = dense(&diag, &off);
        let n = diag.len();
        let e = tridiag_eigen(&diag, &off).unwrap();
        for (i, v) in e.vectors.iter().enumerate() {
            for r in 0..n {
                let av: f64 = (0..n).map(|c| a[r * n + c] * v[c]).sum();
                assert!((av - e.values[i] * v[r]).abs() < 1e-12);
            }
            for (j, w) in e.vectors.iter().enumerate() {
                let dot: f64 = v.iter().zip(w).map(|(x, y)| x * y).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12);
            }
        }
        // The squared first components sum to 1 (SLQ weights).
        let w: f64 = e.first().iter().map(|x| x * x).sum();
        assert!((w - 1.0).abs() < 1e-12);
        // Same eigenvalues as the dense Jacobi solver.
        let j = symmetric_eigenvalues(&a, n);
        for (x, y) in e.values.iter().zip(&j) {
            assert!((x - y).abs() < 1e-10, "{x} vs {y}");
        }
    }

    #[test]
    fn degenerate_sizes() {
        let e = tridiag_eigen(&[5.0], &[]).unwrap();
        assert_eq!(e.values, vec![5.0]);
        assert_eq!(e.vectors, vec![vec![1.0]]);
        assert!(tridiag_eigen(&[], &[]).unwrap().values.is_empty());
        assert!(tridiag_eigen(&[1.0, 2.0], &[]).is_err());
        assert!(tridiag_eigen(&[1.0, f64::NAN], &[0.0]).is_err());
        // Zero matrix.
        let e = tridiag_eigen(&[0.0; 3], &[0.0; 2]).unwrap();
        assert_eq!(e.values, vec![0.0; 3]);
    }

    #[test]
    fn jacobi_on_a_known_spectrum() {
        // Q diag(l) Q^T with Q a Householder reflection.
        let l = [-2.0, 0.0, 1.0, 3.0, 10.0];
        let n = l.len();
        let u: Vec<f64> = vec![1.0, 2.0, -1.0, 0.5, 3.0];
        let uu: f64 = u.iter().map(|x| x * x).sum();
        let q = |i: usize, j: usize| (if i == j { 1.0 } else { 0.0 }) - 2.0 * u[i] * u[j] / uu;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| q(i, k) * l[k] * q(j, k)).sum();
            }
        }
        let ev = symmetric_eigenvalues(&a, n);
        for (x, y) in ev.iter().zip(&l) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}
