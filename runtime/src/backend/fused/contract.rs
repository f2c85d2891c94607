//! The contractions of column-stacked programs: `out[i][j] = sum_c a_i[c] *
//! b_j[c]` over a chunk of columns, for rows `a_i` and `b_j` held in
//! registers. A column-local cluster computes `A[p, n] @ B[q, n]^T` (a
//! weight gradient, or a per-tensor sum against one-hot rows) this way,
//! chunk by chunk, instead of writing `A` and `B` out for a separate
//! product that reads them back.
//!
//! Each chunk's sums are partial: the caller adds the chunks' partials in
//! chunk order, so the result does not depend on how chunks are spread
//! over threads.

/// Rows of `a` and of `b` accumulated together by the vector kernel.
const TILE: usize = 4;

/// `out[i * b.len() + j] = sum_{c < len} a[i][c] * b[j][c]`.
///
/// # Safety
/// Every pointer in `a` and `b` addresses `len` readable floats and `out`
/// `a.len() * b.len()` writable ones.
pub unsafe fn contract_rows(out: *mut f32, a: &[*const f32], b: &[*const f32], len: usize) {
    let (p, q) = (a.len(), b.len());
    let out = std::slice::from_raw_parts_mut(out, p * q);
    // Columns done by the vector kernel, which writes every sum.
    let mut done = None;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            done = Some(tiles_avx512(out, a, b, len));
        }
    }
    let done = done.unwrap_or_else(|| {
        out.fill(0.0);
        0
    });
    // The columns the vector kernel left (all of them without it).
    for (i, &ai) in a.iter().enumerate() {
        let ai = std::slice::from_raw_parts(ai.add(done), len - done);
        for (j, &bj) in b.iter().enumerate() {
            let bj = std::slice::from_raw_parts(bj.add(done), len - done);
            out[i * q + j] += ai.iter().zip(bj).map(|(x, y)| x * y).sum::<f32>();
        }
    }
}

/// The columns in whole blocks of 16, [`TILE`] x [`TILE`] pairs of rows at
/// a time (short tiles repeat their last row and drop its sums); writes
/// every sum and returns how many columns it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles_avx512(out: &mut [f32], a: &[*const f32], b: &[*const f32], len: usize) -> usize {
    use std::arch::x86_64::*;
    let (p, q) = (a.len(), b.len());
    let full = len / 16 * 16;
    for i0 in (0..p).step_by(TILE) {
        let ra: [*const f32; TILE] = std::array::from_fn(|t| a[(i0 + t).min(p - 1)]);
        for j0 in (0..q).step_by(TILE) {
            let rb: [*const f32; TILE] = std::array::from_fn(|t| b[(j0 + t).min(q - 1)]);
            let mut acc = [[_mm512_setzero_ps(); TILE]; TILE];
            let mut c = 0;
            while c < full {
                let xb: [__m512; TILE] = std::array::from_fn(|t| _mm512_loadu_ps(rb[t].add(c)));
                for (s, &pa) in ra.iter().enumerate() {
                    let xa = _mm512_loadu_ps(pa.add(c));
                    for t in 0..TILE {
                        acc[s][t] = _mm512_fmadd_ps(xa, xb[t], acc[s][t]);
                    }
                }
                c += 16;
            }
            for (s, row) in acc.iter().enumerate().take(p - i0) {
                for (t, v) in row.iter().enumerate().take(q - j0) {
                    out[(i0 + s) * q + j0 + t] = _mm512_reduce_add_ps(*v);
                }
            }
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_match_plain_sums() {
        for (p, q, len) in [
            (20, 26, 1024),
            (10, 4, 550),
            (1, 1, 15),
            (5, 7, 33),
            (4, 4, 16),
        ] {
            let row = |r: usize, salt: usize| -> Vec<f32> {
                (0..len)
                    .map(|c| ((c * 7 + r * 13 + salt) % 23) as f32 * 0.1 - 1.0)
                    .collect()
            };
            let a: Vec<Vec<f32>> = (0..p).map(|r| row(r, 1)).collect();
            let b: Vec<Vec<f32>> = (0..q).map(|r| row(r, 5)).collect();
            let pa: Vec<*const f32> = a.iter().map(|r| r.as_ptr()).collect();
            let pb: Vec<*const f32> = b.iter().map(|r| r.as_ptr()).collect();
            let mut out = vec![f32::NAN; p * q];
            unsafe { contract_rows(out.as_mut_ptr(), &pa, &pb, len) };
            for i in 0..p {
                for j in 0..q {
                    let want: f64 = (0..len).map(|c| a[i][c] as f64 * b[j][c] as f64).sum();
                    let got = out[i * q + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "{p}x{q} over {len} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
