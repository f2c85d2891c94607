//! Minibatches of MNIST problems: indices generated on the host from the
//! seed alone, rows gathered on the host.

use anyhow::{ensure, Result};
use ndarray::{ArrayD, IxDyn};

use crate::data::mnist::{Split, PIXELS};
use crate::rng::SplitMix64;
use crate::tensor::HostTensor;

/// Pre-generated minibatch indices: `steps` batches of `batch_size` rows of
/// a split of `n` examples, determined by the seed alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batches {
    pub batch_size: usize,
    /// `steps * batch_size` row indices, batch after batch.
    pub indices: Vec<u32>,
}

impl Batches {
    /// Shuffle `0..n` per epoch (Fisher-Yates on SplitMix64 seeded with
    /// `seed`), cut each permutation into consecutive batches, drop the
    /// epoch's remainder.
    pub fn generate(n: usize, batch_size: usize, steps: usize, seed: u64) -> Result<Self> {
        ensure!(batch_size > 0, "the batch size must be at least 1");
        ensure!(
            n >= batch_size,
            "the split has {n} examples, fewer than one batch of {batch_size}"
        );
        ensure!(
            n <= u32::MAX as usize,
            "the split is too large ({n} examples)"
        );
        let mut rng = SplitMix64::new(seed);
        let mut indices = Vec::with_capacity(steps * batch_size);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        let per_epoch = n / batch_size;
        while indices.len() < steps * batch_size {
            for i in (1..n).rev() {
                let j = rng.below(i + 1);
                perm.swap(i, j);
            }
            let need = steps - indices.len() / batch_size;
            let take = need.min(per_epoch) * batch_size;
            indices.extend_from_slice(&perm[..take]);
        }
        Ok(Batches {
            batch_size,
            indices,
        })
    }

    pub fn steps(&self) -> usize {
        self.indices.len() / self.batch_size
    }

    /// The row indices of step `t` (0-based).
    pub fn batch(&self, t: usize) -> &[u32] {
        &self.indices[t * self.batch_size..(t + 1) * self.batch_size]
    }
}

/// Gathers rows of `split` into `x f32[B,784]`, `y i64[B]`.
pub fn gather(split: &Split, rows: impl IntoIterator<Item = usize>) -> (HostTensor, HostTensor) {
    let rows = rows.into_iter();
    let mut x = Vec::with_capacity(rows.size_hint().0 * PIXELS);
    let mut y = Vec::with_capacity(rows.size_hint().0);
    for r in rows {
        split.push_image(r, &mut x);
        y.push(split.labels[r]);
    }
    let b = y.len();
    (
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, PIXELS]), x).expect("gather: shape")),
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b]), y).expect("gather: shape")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_picks_rows() {
        let mut s = Split {
            pixels: vec![0; 4 * PIXELS],
            labels: vec![0, 1, 2, 3],
        };
        s.pixels[2 * PIXELS] = 51;
        let (x, y) = gather(&s, [2, 0]);
        assert_eq!(x.shape(), &[2, PIXELS]);
        assert_eq!(x.as_f32().unwrap()[[0, 0]], 0.2);
        assert_eq!(y.as_i64().unwrap().as_slice().unwrap(), &[2, 0]);
    }
}
