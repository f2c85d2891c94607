//! Host-side tensors exchanged with inference backends.
//!
//! Every backend (ONNX Runtime, tract) has its own value type; [`HostTensor`] is the one type the rest of
//! metac uses, so that drivers, state buffers and tests never depend on a particular backend. metac's graphs
//! only ever carry `f32` data, `i64` indices/counters and `bool` masks, so those are the only element types
//! supported; anything else is rejected when a model is loaded rather than half-supported at run time.

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

/// Element type of a [`HostTensor`]: the IR's own.
pub use metac_graphs::DType;

/// Named values, in order (graph inputs and outputs, state buffers).
pub type Named<T> = Vec<(String, T)>;

/// The tensors of `rules` drawn with `seed`, under their names.
pub fn draw_named(rules: &[metac_contract::init::TensorInit], seed: u64) -> Named<HostTensor> {
    rules
        .iter()
        .map(|r| (r.name.clone(), HostTensor::from_graph(&r.draw(seed))))
        .collect()
}

/// The tensors of `parts`, in order, as graph tensors under their names
/// (what a workload checkpoints).
pub fn graph_tensors(parts: &[&Named<HostTensor>]) -> Vec<(String, metac_graphs::Tensor)> {
    parts
        .iter()
        .flat_map(|p| p.iter().map(|(n, t)| (n.clone(), t.to_graph())))
        .collect()
}

/// Replace each tensor of `slots` by the entry of its name in `tensors` (a
/// checkpoint), which must have its shape; `what` names the source in errors.
pub fn restore_named(
    slots: &mut Named<HostTensor>,
    tensors: &std::collections::BTreeMap<String, metac_graphs::Tensor>,
    what: &str,
) -> Result<()> {
    use anyhow::Context;
    for (name, t) in slots.iter_mut() {
        let v = tensors
            .get(name.as_str())
            .with_context(|| format!("{what}: no tensor '{name}'"))?;
        anyhow::ensure!(
            v.shape == t.shape(),
            "{what}: '{name}' has shape {:?}, the model {:?}",
            v.shape,
            t.shape()
        );
        *t = HostTensor::from_graph(v);
    }
    Ok(())
}

/// A dense, host-memory tensor of one of the element types metac graphs use.
///
/// Arrays may have any memory layout; backends make them contiguous when (and only when) they need to.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl HostTensor {
    /// The tensor's dimensions (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(a) => a.shape(),
            HostTensor::I64(a) => a.shape(),
            HostTensor::Bool(a) => a.shape(),
        }
    }

    /// Total number of elements (1 for a scalar).
    pub fn num_elements(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostTensor::F32(_) => DType::F32,
            HostTensor::I64(_) => DType::I64,
            HostTensor::Bool(_) => DType::Bool,
        }
    }

    /// `"f32"`, `"i64"` or `"bool"`.
    pub fn dtype_name(&self) -> &'static str {
        self.dtype().name()
    }

    /// A rank-0 `f32` tensor, e.g. for learning rates or loss values.
    pub fn scalar_f32(v: f32) -> Self {
        HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// A rank-0 `i64` tensor, e.g. for step counters.
    pub fn scalar_i64(v: i64) -> Self {
        HostTensor::I64(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// A rank-0 `bool` tensor.
    pub fn scalar_bool(v: bool) -> Self {
        HostTensor::Bool(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// An all-zero tensor of the given type and shape (`false` for `bool`).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Self {
        match dtype {
            DType::F32 => HostTensor::F32(ArrayD::zeros(IxDyn(shape))),
            DType::I64 => HostTensor::I64(ArrayD::zeros(IxDyn(shape))),
            DType::Bool => HostTensor::Bool(ArrayD::from_elem(IxDyn(shape), false)),
        }
    }

    pub fn as_f32(&self) -> Result<&ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Ok(a),
            other => bail!("expected an f32 tensor, got {}", other.describe()),
        }
    }

    pub fn as_i64(&self) -> Result<&ArrayD<i64>> {
        match self {
            HostTensor::I64(a) => Ok(a),
            other => bail!("expected an i64 tensor, got {}", other.describe()),
        }
    }

    pub fn as_bool(&self) -> Result<&ArrayD<bool>> {
        match self {
            HostTensor::Bool(a) => Ok(a),
            other => bail!("expected a bool tensor, got {}", other.describe()),
        }
    }

    pub fn into_f32(self) -> Result<ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Ok(a),
            other => bail!("expected an f32 tensor, got {}", other.describe()),
        }
    }

    pub fn into_i64(self) -> Result<ArrayD<i64>> {
        match self {
            HostTensor::I64(a) => Ok(a),
            other => bail!("expected an i64 tensor, got {}", other.describe()),
        }
    }

    pub fn into_bool(self) -> Result<ArrayD<bool>> {
        match self {
            HostTensor::Bool(a) => Ok(a),
            other => bail!("expected a bool tensor, got {}", other.describe()),
        }
    }

    /// The single value of a one-element `f32` tensor (any rank), e.g. a loss.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        let a = self.as_f32()?;
        match a.len() {
            1 => Ok(*a.iter().next().expect("len is 1")),
            n => bail!(
                "expected a single-element f32 tensor, got {n} elements (shape {:?})",
                a.shape()
            ),
        }
    }

    /// `"f32 tensor of shape [2, 3]"`: used in error messages so users see both halves of a mismatch.
    pub fn describe(&self) -> String {
        format!("{} tensor of shape {:?}", self.dtype_name(), self.shape())
    }
}

impl HostTensor {
    /// A graph constant (initial values, parameters read from a file) as a
    /// host tensor: the one conversion from the IR's tensors.
    pub fn from_graph(t: &metac_graphs::Tensor) -> Self {
        use metac_graphs::TensorData;
        let shape = IxDyn(&t.shape);
        let msg = "a graph tensor's data matches its shape";
        match &t.data {
            TensorData::F32(v) => {
                HostTensor::F32(ArrayD::from_shape_vec(shape, v.clone()).expect(msg))
            }
            TensorData::I64(v) => {
                HostTensor::I64(ArrayD::from_shape_vec(shape, v.clone()).expect(msg))
            }
            TensorData::Bool(v) => {
                HostTensor::Bool(ArrayD::from_shape_vec(shape, v.clone()).expect(msg))
            }
        }
    }

    /// The IR's tensor of the same values (row-major): the inverse of
    /// [`HostTensor::from_graph`].
    pub fn to_graph(&self) -> metac_graphs::Tensor {
        use metac_graphs::Tensor;
        match self {
            HostTensor::F32(a) => Tensor::f32(a.shape(), a.iter().copied().collect()),
            HostTensor::I64(a) => Tensor::i64(a.shape(), a.iter().copied().collect()),
            HostTensor::Bool(a) => Tensor::bool(a.shape(), a.iter().copied().collect()),
        }
    }
}

impl From<ArrayD<f32>> for HostTensor {
    fn from(a: ArrayD<f32>) -> Self {
        HostTensor::F32(a)
    }
}

impl From<ArrayD<i64>> for HostTensor {
    fn from(a: ArrayD<i64>) -> Self {
        HostTensor::I64(a)
    }
}

impl From<ArrayD<bool>> for HostTensor {
    fn from(a: ArrayD<bool>) -> Self {
        HostTensor::Bool(a)
    }
}

/// The transpose of a row-major `rows x cols` matrix, copied tile by tile so
/// that reads and writes both stay within a few cache lines (a strided copy of
/// the 10,000 x 784 objective set takes several times longer).
pub fn transpose_2d<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose_2d: {rows} x {cols} from {} elements",
        src.len()
    );
    const TILE: usize = 32;
    let mut out = vec![T::default(); src.len()];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for c in c0..c1 {
                let dst = &mut out[c * rows + r0..c * rows + r1];
                for (d, r) in dst.iter_mut().zip(r0..r1) {
                    *d = src[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_tensors_round_trip_for_every_dtype() {
        use metac_graphs::Tensor;
        for t in [
            Tensor::f32(&[2, 3], vec![0.5, -1.0, 2.0, f32::MAX, 0.0, -0.0]),
            Tensor::i64(&[3], vec![1, -7, i64::MAX]),
            Tensor::bool(&[2, 1], vec![true, false]),
            Tensor::f32(&[], vec![3.0]),
        ] {
            let h = HostTensor::from_graph(&t);
            assert_eq!(h.shape(), t.shape.as_slice());
            assert_eq!(h.dtype(), t.dtype());
            assert_eq!(h.to_graph(), t);
        }
        // Row-major even from a transposed (non-standard layout) array.
        let a = ndarray::Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap()
            .reversed_axes()
            .into_dyn();
        let t = HostTensor::F32(a).to_graph();
        assert_eq!(t, Tensor::f32(&[3, 2], vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
    }

    #[test]
    fn tiled_transpose_matches_ndarray() {
        for (r, c) in [(1, 1), (3, 70), (33, 65), (100, 7)] {
            let a = ndarray::Array2::from_shape_fn((r, c), |(i, j)| (i * 1000 + j) as f32);
            let t = transpose_2d(a.as_slice().unwrap(), r, c);
            assert_eq!(t, a.t().iter().copied().collect::<Vec<_>>(), "{r} x {c}");
        }
    }

    #[test]
    fn accessors_and_errors() {
        let t = HostTensor::from(ArrayD::<f32>::zeros(IxDyn(&[2, 3])));
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.dtype_name(), "f32");
        assert_eq!(t.num_elements(), 6);
        assert!(t.as_f32().is_ok());
        let err = t.as_i64().unwrap_err().to_string();
        assert!(
            err.contains("expected an i64 tensor") && err.contains("f32 tensor of shape [2, 3]"),
            "{err}"
        );
        assert!(t.clone().into_bool().is_err());
        assert_eq!(t.into_f32().unwrap().len(), 6);

        let s = HostTensor::scalar_f32(2.5);
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.to_scalar_f32().unwrap(), 2.5);
        assert_eq!(HostTensor::scalar_i64(3).dtype(), DType::I64);
        assert_eq!(HostTensor::scalar_bool(true).dtype_name(), "bool");
        assert_eq!(HostTensor::zeros(DType::Bool, &[4]).shape(), &[4]);
        assert!(HostTensor::scalar_i64(1).to_scalar_f32().is_err());
    }
}
