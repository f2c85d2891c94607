//! MNIST batches for L2O meta-training ([`UnrollData`] over a [`Split`]).
//!
//! **Choices:** minibatches and the objective set of each unroll are drawn
//! uniformly *with* replacement (the fork draws a 10,000-example subset per
//! unroll; with replacement, validation on the 5,000-image split can use the
//! compiled 10,000-example objective shape too); the stream is a SplitMix64
//! generator seeded by the caller, so a run is reproducible.

use anyhow::{ensure, Context, Result};

use super::bptt::{Minibatches, Named};
use super::train::UnrollData;
use crate::data::mnist::{Split, PIXELS};
use crate::tensor::HostTensor;

pub use crate::rng::SplitMix64;

/// Minibatches and objective sets drawn from an MNIST split, under the
/// `x`/`y` input names of an L2O layout: the data of `metac run`'s
/// meta-training and validation.
pub struct MnistUnrollData<'a> {
    split: &'a Split,
    /// Size and (image, label) input names of minibatches and objective sets.
    batch: (usize, (String, String)),
    objective: (usize, (String, String)),
    /// The input name of the objective set's transposed images, where the
    /// graphs read them.
    transposed: Option<String>,
    rng: SplitMix64,
    first_objective: Option<Named<HostTensor>>,
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
    /// `batch_names`/`obj_names`/`obj_transposed`: the layout's `batch`,
    /// `objective_batch` and `objective_transposed` (the objective set's
    /// images are also handed out transposed when the graphs read that).
    pub fn new(
        split: &'a Split,
        batch: usize,
        objective_examples: usize,
        batch_names: &[String],
        obj_names: &[String],
        obj_transposed: &[(String, String)],
        seed: u64,
    ) -> Result<Self> {
        ensure!(
            batch > 0 && objective_examples > 0 && !split.is_empty(),
            "empty minibatch, objective set or split"
        );
        let objective = xy_names(obj_names, "objective set")?;
        let transposed = obj_transposed
            .iter()
            .find(|(_, src)| *src == objective.0)
            .map(|(name, _)| name.clone());
        Ok(MnistUnrollData {
            split,
            batch: (batch, xy_names(batch_names, "minibatch")?),
            objective: (objective_examples, objective),
            transposed,
            rng: SplitMix64::new(seed),
            first_objective: None,
        })
    }

    /// Hands `batch` out as the objective set of unroll 0 instead of a new
    /// draw: the set the initial objective was measured on.
    pub fn set_first_objective(&mut self, batch: Named<HostTensor>) {
        self.first_objective = Some(batch);
    }

    fn draw(&mut self, n: usize) -> Vec<usize> {
        let len = self.split.len();
        (0..n).map(|_| self.rng.below(len)).collect()
    }
}

impl<'a> UnrollData<'a> for MnistUnrollData<'a> {
    fn minibatch(&mut self, _step: usize) -> Result<Named<HostTensor>> {
        let idx = self.draw(self.batch.0);
        Ok(named_rows(self.split, idx, &self.batch.1))
    }

    fn minibatches(
        &mut self,
        _first: usize,
        count: usize,
    ) -> Result<Box<dyn Minibatches<HostTensor> + 'a>> {
        // The same draws as `minibatch`, step by step; the rows are gathered
        // when BPTT reaches the step.
        let rows = (0..count).map(|_| self.draw(self.batch.0)).collect();
        Ok(Box::new(RowBatches {
            split: self.split,
            names: self.batch.1.clone(),
            rows,
        }))
    }

    fn objective_batch(&mut self, unroll: usize) -> Result<Named<HostTensor>> {
        if unroll == 0 {
            if let Some(b) = self.first_objective.take() {
                return Ok(b);
            }
        }
        let idx = self.draw(self.objective.0);
        let mut set = named_rows(self.split, idx.iter().copied(), &self.objective.1);
        // The transposed images too where the objective graph reads them
        // (bundles whose objective is row-major): made from the bytes, not
        // by transposing `set`.
        if let Some(name) = &self.transposed {
            let xt = HostTensor::F32(
                ndarray::ArrayD::from_shape_vec(
                    ndarray::IxDyn(&[PIXELS, idx.len()]),
                    self.split.images_transposed(&idx),
                )
                .expect("transposed shape"),
            );
            set.push((name.clone(), xt));
        }
        Ok(set)
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
        let mut d =
            MnistUnrollData::new(&split, 3, 10, &names("batch"), &names("obj"), &[], 1).unwrap();
        let b = d.minibatch(0).unwrap();
        assert_eq!(b[0].0, "batch.x");
        assert_eq!(b[0].1.shape(), &[3, PIXELS]);
        // Image i is filled with i and has label i.
        let (x, y) = (b[0].1.as_f32().unwrap(), b[1].1.as_i64().unwrap());
        for r in 0..3 {
            assert_eq!((x[[r, 5]] * 255.0).round() as i64, y[r]);
        }
        // An objective set larger than the split (drawn with replacement).
        let o = d.objective_batch(1).unwrap();
        assert_eq!(o[0].0, "obj.x");
        assert_eq!(o[0].1.shape(), &[10, PIXELS]);
        assert_eq!(
            o.len(),
            2,
            "no transposed images unless the layout reads them"
        );
        // A layout that reads the transposed images gets them.
        let transposed = [("obj.x.T".to_string(), "obj.x".to_string())];
        let mut d = MnistUnrollData::new(
            &split,
            3,
            10,
            &names("batch"),
            &names("obj"),
            &transposed,
            1,
        )
        .unwrap();
        let o = d.objective_batch(1).unwrap();
        assert_eq!(o[2].0, "obj.x.T");
        let (x, xt) = (o[0].1.as_f32().unwrap(), o[2].1.as_f32().unwrap());
        assert_eq!(xt.shape(), &[PIXELS, 10]);
        assert_eq!(xt.t(), x);
        // A set handed in for unroll 0 is returned once, then draws resume.
        let mut d =
            MnistUnrollData::new(&split, 3, 20, &names("batch"), &names("obj"), &[], 1).unwrap();
        let first = d.objective_batch(0).unwrap();
        d.set_first_objective(first.clone());
        assert_eq!(
            d.objective_batch(0).unwrap()[1].1.as_i64().unwrap(),
            first[1].1.as_i64().unwrap()
        );
        assert_eq!(d.objective_batch(0).unwrap()[0].1.shape(), &[20, PIXELS]);
        assert!(
            MnistUnrollData::new(&split, 0, 11, &names("batch"), &names("obj"), &[], 1).is_err()
        );
    }
}
