//! Element types, static shapes and constant tensors.

use std::fmt;

/// The element types of the IR: f32 for values, i64 for indices and shapes,
/// bool for masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        self == DType::F32
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A static shape. Every dimension is known at compile time.
pub type Shape = Vec<usize>;

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The type of a value in the graph: dtype and static shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: &[usize]) -> Self {
        TensorType {
            dtype,
            shape: shape.to_vec(),
        }
    }
    pub fn f32(shape: &[usize]) -> Self {
        Self::new(DType::F32, shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

/// Constant data, stored at the precision of its dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

/// A constant tensor (an ONNX initializer when exported).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Shape,
    pub data: TensorData,
}

impl Tensor {
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(numel(shape), data.len(), "tensor data does not match shape");
        Tensor {
            shape: shape.to_vec(),
            data: TensorData::F32(data),
        }
    }
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Self {
        assert_eq!(numel(shape), data.len(), "tensor data does not match shape");
        Tensor {
            shape: shape.to_vec(),
            data: TensorData::I64(data),
        }
    }
    pub fn bool(shape: &[usize], data: Vec<bool>) -> Self {
        assert_eq!(numel(shape), data.len(), "tensor data does not match shape");
        Tensor {
            shape: shape.to_vec(),
            data: TensorData::Bool(data),
        }
    }
    pub fn scalar_f32(v: f32) -> Self {
        Self::f32(&[], vec![v])
    }
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I64(_) => DType::I64,
            TensorData::Bool(_) => DType::Bool,
        }
    }
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), &self.shape)
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// The values as i64 (for shape and index constants).
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }
    /// Bit-exact identity key, used by CSE (f32 compared by bits so that NaN
    /// constants and -0.0 are kept apart).
    pub fn bits_key(&self) -> (Shape, u8, Vec<u64>) {
        let (tag, bits) = match &self.data {
            TensorData::F32(v) => (0, v.iter().map(|x| x.to_bits() as u64).collect()),
            TensorData::I64(v) => (1, v.iter().map(|x| *x as u64).collect()),
            TensorData::Bool(v) => (2, v.iter().map(|x| *x as u64).collect()),
        };
        (self.shape.clone(), tag, bits)
    }
}
