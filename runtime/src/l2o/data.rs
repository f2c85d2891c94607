//! MNIST batches for L2O meta-training ([`UnrollData`] over a [`Split`]).
//!
//! **Choices:** minibatches are drawn uniformly *with* replacement (each
//! step independent); the objective set of each unroll is a uniformly drawn
//! subset *without* replacement (the fork draws a 10,000-example subset per
//! unroll); the stream is a SplitMix64 generator seeded by the caller, so a
//! run is reproducible.

use anyhow::{ensure, Context, Result};

use super::bptt::{Minibatches, Named};
use super::train::UnrollData;
use crate::data::mnist::Split;
use crate::tensor::HostTensor;

pub use crate::rng::SplitMix64;

/// Minibatches and objective sets drawn from an MNIST split, under the
/// `x`/`y` input names of an L2O layout.
pub struct MnistUnrollData<'a> {
    split: &'a Split,
    batch: usize,
    objective_examples: usize,
    batch_names: (String, String),
    obj_names: (String, String),
    rng: SplitMix64,
    perm: Vec<usize>,
}

/// The image and label input names (`*.x`, `*.y`) among a layout's names.
pub fn xy_names(names: &[String], what: &str) -> Result<(String, String)> {
    let find = |suffix: &str| {
        names
            .iter()
            .find(|n| n.ends_with(suffix))
            .cloned()
            .with_context(|| format!("{what}: no input ending in '{suffix}' among {names:?}"))
    };
    Ok((find(".x")?, find(".y")?))
}

/// Minibatches as rows of a split, gathered when a step asks for them.
pub struct RowBatches<'a> {
    pub split: &'a Split,
    pub names: (String, String),
    /// The rows of each step's minibatch.
    pub rows: Vec<Vec<usize>>,
}

impl Minibatches<HostTensor> for RowBatches<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn get(&self, t: usize) -> Result<std::borrow::Cow<'_, Named<HostTensor>>> {
        let rows = self
            .rows
            .get(t)
            .with_context(|| format!("no minibatch for step {t}"))?;
        Ok(std::borrow::Cow::Owned(named_rows(
            self.split,
            rows.iter().copied(),
            &self.names,
        )))
    }
}

/// Rows of a split as the named inputs `(names.0: images, names.1: labels)`.
pub fn named_rows(
    split: &Split,
    rows: impl IntoIterator<Item = usize>,
    names: &(String, String),
) -> Named<HostTensor> {
    let (x, y) = crate::metatest::gather(split, rows);
    vec![(names.0.clone(), x), (names.1.clone(), y)]
}

impl<'a> MnistUnrollData<'a> {
    /// `batch_names`/`obj_names`: the layout's `batch` and `objective_batch`.
    pub fn new(
        split: &'a Split,
        batch: usize,
        objective_examples: usize,
        batch_names: &[String],
        obj_names: &[String],
        seed: u64,
    ) -> Result<Self> {
        ensure!(batch > 0 && !split.is_empty(), "empty batch or split");
        ensure!(
            objective_examples <= split.len(),
            "an objective set of {objective_examples} examples from a split of {}",
            split.len()
        );
        Ok(MnistUnrollData {
            split,
            batch,
            objective_examples,
            batch_names: xy_names(batch_names, "minibatch")?,
            obj_names: xy_names(obj_names, "objective set")?,
            rng: SplitMix64::new(seed),
            perm: (0..split.len()).collect(),
        })
    }

    fn gather(&self, idx: &[usize], names: &(String, String)) -> Named<HostTensor> {
        named_rows(self.split, idx.iter().copied(), names)
    }
}

impl<'a> UnrollData<'a> for MnistUnrollData<'a> {
    fn minibatch(&mut self, _step: usize) -> Result<Named<HostTensor>> {
        let n = self.split.len();
        let idx: Vec<usize> = (0..self.batch).map(|_| self.rng.below(n)).collect();
        Ok(self.gather(&idx, &self.batch_names))
    }

    fn objective_batch(&mut self, _unroll: usize) -> Result<Named<HostTensor>> {
        // Partial Fisher-Yates: the first k entries become a uniform subset.
        let n = self.perm.len();
        for i in 0..self.objective_examples {
            let j = i + self.rng.below(n - i);
            self.perm.swap(i, j);
        }
        let idx = self.perm[..self.objective_examples].to_vec();
        Ok(self.gather(&idx, &self.obj_names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::PIXELS;

    #[test]
    fn batches_have_the_layout_names_and_shapes() {
        let n = 10;
        let split = Split {
            pixels: (0..n * PIXELS).map(|i| (i / PIXELS) as u8).collect(),
            labels: (0..n as i64).collect(),
        };
        let names = |p: &str| vec![format!("{p}.x"), format!("{p}.y")];
        let mut d = MnistUnrollData::new(&split, 3, 10, &names("batch"), &names("obj"), 1).unwrap();
        let b = d.minibatch(0).unwrap();
        assert_eq!(b[0].0, "batch.x");
        assert_eq!(b[0].1.shape(), &[3, PIXELS]);
        // Image i is filled with i and has label i.
        let (x, y) = (b[0].1.as_f32().unwrap(), b[1].1.as_i64().unwrap());
        for r in 0..3 {
            assert_eq!((x[[r, 5]] * 255.0).round() as i64, y[r]);
        }
        let o = d.objective_batch(0).unwrap();
        let mut labels: Vec<i64> = o[1].1.as_i64().unwrap().iter().copied().collect();
        labels.sort_unstable();
        assert_eq!(
            labels,
            (0..10).collect::<Vec<_>>(),
            "a subset without replacement"
        );
        assert!(MnistUnrollData::new(&split, 3, 11, &names("batch"), &names("obj"), 1).is_err());
    }
}
