//! The products of column-stacked programs: rows `d_r = sum_j W[r, j] *
//! x_j` over a chunk of columns, for several rows `r` that read the same
//! source rows `x_j` (one `W @ X` of a GRU cell).
//!
//! Computed a row at a time, every output row reads every source row again.
//! Here a block of output rows and 32 columns is accumulated in vector
//! registers, so each load of a source feeds eight multiply-adds; the weights
//! are broadcast. Rows of sums are written once.

/// Largest inner dimension (`W`'s columns) of a product.
pub use metac_graphs::fusion::program::MAX_INNER;

/// Rows accumulated together by the vector kernel.
const ROWS: usize = 8;

/// `dsts[r][c] = sum_j weights[r][j] * srcs[j][c]` for `c < len`.
///
/// # Safety
/// Every `dsts[r]` addresses `len` writable floats and every `srcs[j]`
/// `len` readable ones, no destination overlaps a source, and every
/// `weights[r]` has `srcs.len() <= MAX_INNER` entries.
pub unsafe fn dot_rows(dsts: &[*mut f32], weights: &[&[f32]], srcs: &[*const f32], len: usize) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        // Fewer than three rows would mostly multiply padding.
        if dsts.len() >= 3 && std::arch::is_x86_feature_detected!("avx512f") {
            done = blocks_avx512(dsts, weights, srcs, len);
        }
    }
    for (d, w) in dsts.iter().zip(weights) {
        let d = std::slice::from_raw_parts_mut(d.add(done), len - done);
        d.fill(0.0);
        for (&wj, &s) in w.iter().zip(srcs) {
            let s = std::slice::from_raw_parts(s.add(done), len - done);
            for (a, &x) in d.iter_mut().zip(s) {
                *a += wj * x;
            }
        }
    }
}

/// The columns in whole blocks of 32, [`ROWS`] rows at a time (the last
/// group padded with zero weights); returns how many columns it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn blocks_avx512(
    dsts: &[*mut f32],
    weights: &[&[f32]],
    srcs: &[*const f32],
    len: usize,
) -> usize {
    use std::arch::x86_64::*;
    let inner = srcs.len();
    assert!(inner <= MAX_INNER, "product of {inner} rows");
    let full = len / 32 * 32;
    // Weights of one group of rows, interleaved: `w[j * ROWS + r]`.
    let mut w = [0.0f32; ROWS * MAX_INNER];
    for r0 in (0..dsts.len()).step_by(ROWS) {
        let rows = (dsts.len() - r0).min(ROWS);
        for j in 0..inner {
            for r in 0..ROWS {
                w[j * ROWS + r] = if r < rows { weights[r0 + r][j] } else { 0.0 };
            }
        }
        let mut c = 0;
        while c < full {
            let mut lo = [_mm512_setzero_ps(); ROWS];
            let mut hi = [_mm512_setzero_ps(); ROWS];
            for (j, &s) in srcs.iter().enumerate() {
                let x0 = _mm512_loadu_ps(s.add(c));
                let x1 = _mm512_loadu_ps(s.add(c + 16));
                for r in 0..ROWS {
                    let wr = _mm512_set1_ps(*w.get_unchecked(j * ROWS + r));
                    lo[r] = _mm512_fmadd_ps(wr, x0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(wr, x1, hi[r]);
                }
            }
            for r in 0..rows {
                _mm512_storeu_ps(dsts[r0 + r].add(c), lo[r]);
                _mm512_storeu_ps(dsts[r0 + r].add(c + 16), hi[r]);
            }
            c += 32;
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_rows_match_row_by_row_sums() {
        for (rows, inner, len) in [
            (20, 26, 1024),
            (10, 26, 550),
            (3, 4, 45),
            (1, 4, 64),
            (9, 64, 31),
        ] {
            let srcs: Vec<Vec<f32>> = (0..inner)
                .map(|j| {
                    (0..len)
                        .map(|c| ((c * 7 + j * 13) % 23) as f32 * 0.1 - 1.0)
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = (0..rows)
                .map(|r| {
                    (0..inner)
                        .map(|j| ((r * 5 + j * 3) % 11) as f32 * 0.2 - 1.0)
                        .collect()
                })
                .collect();
            let mut out = vec![vec![f32::NAN; len]; rows];
            let dsts: Vec<*mut f32> = out.iter_mut().map(|o| o.as_mut_ptr()).collect();
            let ws: Vec<&[f32]> = w.iter().map(|r| r.as_slice()).collect();
            let ss: Vec<*const f32> = srcs.iter().map(|s| s.as_ptr()).collect();
            unsafe { dot_rows(&dsts, &ws, &ss, len) };
            for r in 0..rows {
                for c in 0..len {
                    let want: f64 = (0..inner).map(|j| w[r][j] as f64 * srcs[j][c] as f64).sum();
                    let got = out[r][c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * want.abs().max(1.0),
                        "{rows}x{inner} ({r}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
