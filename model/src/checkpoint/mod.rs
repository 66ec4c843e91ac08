//! Reading and writing model weights: reference checkpoints in, the project's own format in
//! and out.

pub mod native;
pub mod pickle;
pub mod taming;
pub mod torch_file;

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};

use crate::error::ModelError;
use crate::vqgan::Vqgan;

/// A named f32 tensor ready to be applied to a module.
pub(crate) fn pack_f32(name: &str, values: Vec<f32>, shape: &[usize]) -> PackTensor {
    PackTensor::new(
        name.to_string(),
        DType::F32,
        shape.to_vec(),
        None,
        Bytes::from_elems(values),
    )
}

/// Applies tensors that must cover every parameter of `model`.
pub(crate) fn apply_all(model: &mut Vqgan, tensors: Vec<PackTensor>) -> Result<(), ModelError> {
    let result = model.apply(tensors, None, None, true);
    if let Some(err) = result.errors.first() {
        return Err(ModelError::tensor(err.to_string(), "could not be applied"));
    }
    if let Some((name, why)) = result.missing.first() {
        return Err(ModelError::tensor(
            name,
            format!("was not provided ({why})"),
        ));
    }
    Ok(())
}
