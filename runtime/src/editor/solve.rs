//! The least-squares parameter shift of one edited layer and its adjoint,
//! in f64 with faer's Cholesky factorisation.
//!
//! Given the cached keys `U [n, in]` (one row per edit) and the values `D
//! [n, out]` the hypernetwork made of them, the shift of the layer's weight
//! `W [in, out]` (`v = u W + b`) is
//!
//! ```text
//! S = argmin_S sum_j |u_j S - d_j|^2 + lambda |S|^2 = (U^T U + lambda I)^{-1} U^T D
//! ```
//!
//! with `lambda = exp(lamda)`. For a loss `L(S)` with `G = dL/dS`, and
//! `M = (U^T U + lambda I)^{-1} G` (the matrix is symmetric):
//!
//! ```text
//! dL/dD = U M        dL/dlamda = -lambda <M, S>
//! ```
//!
//! With a regulariser matrix `C` (symmetric positive definite; MEMIT's
//! covariance of the keys to preserve, [`Shift::solve_with`]) the penalty
//! is `lambda tr(S^T C S)`: `S = (U^T U + lambda C)^{-1} U^T D`, the same
//! `dL/dD`, and `dL/dlamda = -lambda <M, C S>`. `C = I` is MALMEN's.
//!
//! MEND's rule, the baseline ([`Shift::sum`]), is `S = U^T D`, the sum of
//! the edits' rank-one shifts: `dL/dD = U G`, and no `lambda`.
//!
//! Why on the host: ONNX has no linear solve, and an `in x in` Cholesky
//! (512 x 512 for an MLP output projection of the reference model) is cheap
//! next to the language model's passes. Rows of zeros (padding) change
//! nothing.

use anyhow::{ensure, Context, Result};
use faer::linalg::solvers::{Llt, Solve};
use faer::{Mat, Side};

/// One layer's shift, with what its adjoint needs.
pub struct Shift {
    u: Mat<f64>,
    /// The factor of `U^T U + lambda I` (`None`: the sum rule).
    llt: Option<Llt<f64>>,
    lambda: f64,
    s: Mat<f64>,
    /// The regulariser `C` (`None`: the identity).
    reg: Option<Mat<f64>>,
}

fn mat(v: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

fn flat(m: &Mat<f64>) -> Vec<f64> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn narrow(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

impl Shift {
    /// The shift of keys `u` (`[n, d_in]`, row-major) and values `d` (`[n,
    /// d_out]`) with `lambda = exp(lamda)`.
    pub fn solve(
        u: &[f32],
        d: &[f32],
        n: usize,
        d_in: usize,
        d_out: usize,
        lamda: f32,
    ) -> Result<Self> {
        Self::solve_f64(&widen(u), &widen(d), n, d_in, d_out, f64::from(lamda), None)
    }

    /// [`Shift::solve`] with the regulariser `reg` (`C`, `[d_in, d_in]`
    /// row-major, symmetric positive definite) in place of the identity.
    #[allow(clippy::too_many_arguments)]
    pub fn solve_with(
        u: &[f32],
        d: &[f32],
        n: usize,
        d_in: usize,
        d_out: usize,
        lamda: f32,
        reg: Option<&[f64]>,
    ) -> Result<Self> {
        Self::solve_f64(&widen(u), &widen(d), n, d_in, d_out, f64::from(lamda), reg)
    }

    /// [`Shift::solve_with`] of f64 data.
    pub fn solve_f64(
        u: &[f64],
        d: &[f64],
        n: usize,
        d_in: usize,
        d_out: usize,
        lamda: f64,
        reg: Option<&[f64]>,
    ) -> Result<Self> {
        ensure!(
            u.len() == n * d_in && d.len() == n * d_out,
            "least squares: keys of {} and values of {} numbers for {n} rows of {d_in} and {d_out}",
            u.len(),
            d.len()
        );
        let lambda = lamda.exp();
        ensure!(
            lambda.is_finite() && lambda > 0.0,
            "least squares: lambda = exp({lamda}) is not a positive number"
        );
        let um = mat(u, n, d_in);
        let dm = mat(d, n, d_out);
        let mut a = um.transpose() * &um;
        let reg = match reg {
            Some(c) => {
                ensure!(
                    c.len() == d_in * d_in,
                    "least squares: a regulariser of {} numbers for {d_in} x {d_in}",
                    c.len()
                );
                let c = mat(c, d_in, d_in);
                a += &c * lambda;
                Some(c)
            }
            None => {
                for i in 0..d_in {
                    a[(i, i)] += lambda;
                }
                None
            }
        };
        let llt = a.llt(Side::Lower).map_err(|e| {
            anyhow::anyhow!("least squares: U^T U + lambda C is not positive definite ({e:?})")
        })?;
        let rhs = um.transpose() * &dm;
        let s = llt.solve(&rhs);
        Ok(Shift {
            u: um,
            llt: Some(llt),
            lambda,
            s,
            reg,
        })
    }

    /// MEND's rule: `S = U^T D`.
    pub fn sum(u: &[f32], d: &[f32], n: usize, d_in: usize, d_out: usize) -> Result<Self> {
        ensure!(
            u.len() == n * d_in && d.len() == n * d_out,
            "sum of shifts: keys of {} and values of {} numbers for {n} rows of {d_in} and {d_out}",
            u.len(),
            d.len()
        );
        let um = mat(&widen(u), n, d_in);
        let s = um.transpose() * mat(&widen(d), n, d_out);
        Ok(Shift {
            u: um,
            llt: None,
            lambda: 0.0,
            s,
            reg: None,
        })
    }

    /// `S [d_in, d_out]`, row-major f32.
    pub fn shift(&self) -> Vec<f32> {
        narrow(flat(&self.s))
    }

    /// `S` in f64.
    pub fn shift_f64(&self) -> Vec<f64> {
        flat(&self.s)
    }

    /// `lambda = exp(lamda)`.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// `(U^T U + lambda I)^{-1} B` for `B [d_in, cols]` (row-major).
    pub fn apply_inverse(&self, b: &[f64], cols: usize) -> Result<Vec<f64>> {
        let d_in = self.s.nrows();
        ensure!(
            b.len() == d_in * cols,
            "least squares: {} numbers for a {d_in} x {cols} matrix",
            b.len()
        );
        let llt = self
            .llt
            .as_ref()
            .context("the sum rule has no matrix to invert")?;
        Ok(flat(&llt.solve(&mat(b, d_in, cols))))
    }

    /// For `g = dL/dS` (`[d_in, d_out]`, row-major): `dL/dD` (`[n, d_out]`)
    /// and `dL/dlamda`.
    pub fn backward(&self, g: &[f32]) -> Result<(Vec<f32>, f64)> {
        let (dd, dl) = self.backward_f64(&widen(g))?;
        Ok((narrow(dd), dl))
    }

    /// [`Shift::backward`] in f64.
    pub fn backward_f64(&self, g: &[f64]) -> Result<(Vec<f64>, f64)> {
        let (d_in, d_out) = (self.s.nrows(), self.s.ncols());
        ensure!(
            g.len() == d_in * d_out,
            "least squares: a gradient of {} numbers for a {d_in} x {d_out} shift",
            g.len()
        );
        let g = mat(g, d_in, d_out);
        let Some(llt) = &self.llt else {
            return Ok((flat(&(&self.u * &g)), 0.0));
        };
        let m = llt.solve(&g);
        let dd = &self.u * &m;
        let cs = match &self.reg {
            Some(c) => c * &self.s,
            None => self.s.clone(),
        };
        let mut inner = 0.0;
        for i in 0..d_in {
            for j in 0..d_out {
                inner += m[(i, j)] * cs[(i, j)];
            }
        }
        Ok((flat(&dd), -self.lambda * inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metac_contract::init::SeededRng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SeededRng::new(seed, 0);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// `(U^T U + lambda I) S = U^T D` by Gauss-Jordan elimination in f64,
    /// independently of faer.
    fn reference(u: &[f32], d: &[f32], n: usize, di: usize, dout: usize, lambda: f64) -> Vec<f64> {
        reference_with(u, d, n, di, dout, lambda, None)
    }

    /// `(U^T U + lambda C) S = U^T D`, `C = I` without `c`.
    fn reference_with(
        u: &[f32],
        d: &[f32],
        n: usize,
        di: usize,
        dout: usize,
        lambda: f64,
        c: Option<&[f64]>,
    ) -> Vec<f64> {
        let mut a = vec![vec![0.0f64; di + dout]; di];
        for i in 0..di {
            for j in 0..di {
                a[i][j] = (0..n)
                    .map(|r| f64::from(u[r * di + i]) * f64::from(u[r * di + j]))
                    .sum();
                if let Some(c) = c {
                    a[i][j] += lambda * c[i * di + j];
                }
            }
            if c.is_none() {
                a[i][i] += lambda;
            }
            for j in 0..dout {
                a[i][di + j] = (0..n)
                    .map(|r| f64::from(u[r * di + i]) * f64::from(d[r * dout + j]))
                    .sum();
            }
        }
        for c in 0..di {
            let p = (c..di)
                .max_by(|&x, &y| a[x][c].abs().total_cmp(&a[y][c].abs()))
                .unwrap();
            a.swap(c, p);
            let piv = a[c][c];
            for v in a[c].iter_mut() {
                *v /= piv;
            }
            for r in 0..di {
                if r != c {
                    let f = a[r][c];
                    let row = a[c].clone();
                    for (x, y) in a[r].iter_mut().zip(row) {
                        *x -= f * y;
                    }
                }
            }
        }
        (0..di).flat_map(|i| a[i][di..].to_vec()).collect()
    }

    #[test]
    fn the_shift_agrees_with_a_float64_reference() {
        // More edits than inputs and fewer: both are well posed with lambda.
        for (n, di, dout, lamda) in [(50, 8, 3, 0.0f32), (5, 12, 4, -2.0), (300, 64, 16, 1.5)] {
            let (u, d) = (random(n * di, 1), random(n * dout, 2));
            let s = Shift::solve(&u, &d, n, di, dout, lamda).unwrap();
            let want = reference(&u, &d, n, di, dout, f64::from(lamda).exp());
            let got = s.shift();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm = want.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(err <= 1e-6 * norm, "n {n}: error {err}, norm {norm}");
        }
    }

    #[test]
    fn the_adjoint_matches_finite_differences() {
        let (n, di, dout) = (20, 6, 3);
        let (u, d, g) = (random(n * di, 3), random(n * dout, 4), random(di * dout, 5));
        let lamda = 0.3f32;
        // L(S) = <G, S>, in f64 through the reference.
        let loss = |d: &[f32], lamda: f64| -> f64 {
            let s = reference(&u, d, n, di, dout, lamda.exp());
            s.iter().zip(&g).map(|(a, b)| a * f64::from(*b)).sum()
        };
        let shift = Shift::solve(&u, &d, n, di, dout, lamda).unwrap();
        let (dd, dl) = shift.backward(&g).unwrap();
        let h = 1e-3;
        let fd = (loss(&d, f64::from(lamda) + h) - loss(&d, f64::from(lamda) - h)) / (2.0 * h);
        assert!(
            (fd - dl).abs() <= 1e-6 * fd.abs().max(1e-3),
            "dL/dlamda {dl}, fd {fd}"
        );
        // dL/dD is linear in D: one entry at a time, exactly.
        for k in [0, 7, n * dout - 1] {
            let (mut p, mut m) = (d.clone(), d.clone());
            p[k] += 0.5;
            m[k] -= 0.5;
            let fd = loss(&p, f64::from(lamda)) - loss(&m, f64::from(lamda));
            assert!(
                (fd - f64::from(dd[k])).abs() <= 1e-5 * fd.abs().max(1e-3),
                "dL/dD[{k}] {} vs {fd}",
                dd[k]
            );
        }
        // The sum rule: S = U^T D, linear in D.
        let sum = Shift::sum(&u, &d, n, di, dout).unwrap();
        let (dd, dl) = sum.backward(&g).unwrap();
        assert_eq!(dl, 0.0);
        let inner = |d: &[f32]| -> f64 {
            let s = Shift::sum(&u, d, n, di, dout).unwrap().shift_f64();
            s.iter().zip(&g).map(|(a, b)| a * f64::from(*b)).sum()
        };
        for k in [0, 7, n * dout - 1] {
            let mut p = d.clone();
            p[k] += 1.0;
            let fd = inner(&p) - inner(&d);
            assert!(
                (fd - f64::from(dd[k])).abs() <= 1e-5 * fd.abs().max(1e-3),
                "sum: dL/dD[{k}] {} vs {fd}",
                dd[k]
            );
        }
        let e = Shift::solve(&u, &d, n, di, dout, f32::NAN).err().unwrap();
        assert!(format!("{e}").contains("lambda"), "{e}");
    }

    #[test]
    fn a_regulariser_matrix_changes_the_penalty_and_its_adjoint_follows() {
        let (n, di, dout) = (4, 6, 3);
        let (u, d, g) = (random(n * di, 6), random(n * dout, 7), random(di * dout, 8));
        // C = B B^T + 0.1 I, symmetric positive definite.
        let b = random(di * di, 9);
        let c: Vec<f64> = (0..di * di)
            .map(|k| {
                let (i, j) = (k / di, k % di);
                let bb: f64 = (0..di)
                    .map(|t| f64::from(b[i * di + t]) * f64::from(b[j * di + t]))
                    .sum();
                bb + if i == j { 0.1 } else { 0.0 }
            })
            .collect();
        let lamda = -0.4f32;
        let s = Shift::solve_with(&u, &d, n, di, dout, lamda, Some(&c)).unwrap();
        let want = reference_with(&u, &d, n, di, dout, f64::from(lamda).exp(), Some(&c));
        for (a, b) in s.shift_f64().iter().zip(&want) {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Fewer edits than inputs: the regulariser decides the shift.
        let plain = Shift::solve(&u, &d, n, di, dout, lamda)
            .unwrap()
            .shift_f64();
        let diff: f64 = plain.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum();
        assert!(diff > 1e-3, "C changed nothing");
        let loss = |d: &[f32], lamda: f64| -> f64 {
            let s = reference_with(&u, d, n, di, dout, lamda.exp(), Some(&c));
            s.iter().zip(&g).map(|(a, b)| a * f64::from(*b)).sum()
        };
        let (dd, dl) = s.backward(&g).unwrap();
        let h = 1e-4;
        let fd = (loss(&d, f64::from(lamda) + h) - loss(&d, f64::from(lamda) - h)) / (2.0 * h);
        assert!(
            (fd - dl).abs() <= 1e-6 * fd.abs().max(1e-3),
            "dL/dlamda {dl}, fd {fd}"
        );
        for k in [0, 5, n * dout - 1] {
            let (mut p, mut m) = (d.clone(), d.clone());
            p[k] += 0.5;
            m[k] -= 0.5;
            let fd = loss(&p, f64::from(lamda)) - loss(&m, f64::from(lamda));
            assert!(
                (fd - f64::from(dd[k])).abs() <= 1e-5 * fd.abs().max(1e-3),
                "dL/dD[{k}] {} vs {fd}",
                dd[k]
            );
        }
    }
}
