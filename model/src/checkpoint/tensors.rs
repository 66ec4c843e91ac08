//! Tensors as read from a checkpoint file, before they are applied to a module.

use crate::error::ModelError;

/// Tensor values after conversion: floats as f32, integers as i64.
#[derive(Debug, Clone, PartialEq)]
pub enum RawData {
    /// Any floating-point storage (f64, f32, f16, bf16), converted to f32.
    F32(Vec<f32>),
    /// Any integer or bool storage, converted to i64.
    I64(Vec<i64>),
}

/// One tensor read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Contiguous row-major values.
    pub data: RawData,
}

impl RawTensor {
    /// The float values, or an error naming `name` if the tensor holds integers.
    pub fn f32s(&self, name: &str) -> Result<&[f32], ModelError> {
        match &self.data {
            RawData::F32(v) => Ok(v),
            RawData::I64(_) => Err(ModelError::tensor(
                name,
                "expected a float tensor, found integers",
            )),
        }
    }
}
