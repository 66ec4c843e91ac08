//! Model weights: the project's own format in and out ([`native`]), and filling a module from
//! named tensors that a reader (the `taming-import` crate for PyTorch files) produced.

pub mod native;
pub mod tensors;

use std::collections::BTreeMap;
use std::path::Path;

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};

use crate::error::ModelError;
use tensors::RawTensor;

/// A named f32 tensor ready to be applied to a module.
pub fn pack_f32(name: &str, values: Vec<f32>, shape: &[usize]) -> PackTensor {
    PackTensor::new(
        name.to_string(),
        DType::F32,
        shape.to_vec(),
        None,
        Bytes::from_elems(values),
    )
}

/// Fills every parameter of `model` from `tensors`, where `name_of` gives the checkpoint's
/// name for a module path. Errors name the missing or misshapen tensor and `source`; the
/// tensors left over are returned.
pub fn fill_from<M: ModuleSnapshot>(
    model: &mut M,
    mut tensors: BTreeMap<String, RawTensor>,
    name_of: impl Fn(&str) -> String,
    source: &Path,
) -> Result<BTreeMap<String, RawTensor>, ModelError> {
    let mut pack = Vec::new();
    for slot in model.collect(None, None, true) {
        let name = name_of(&slot.name);
        let expected: Vec<usize> = slot.shape.to_vec();
        let tensor = tensors.remove(&name).ok_or_else(|| {
            ModelError::tensor(
                &name,
                format!(
                    "missing from {} (the config needs shape {expected:?})",
                    source.display()
                ),
            )
        })?;
        if tensor.shape != expected {
            return Err(ModelError::tensor(
                &name,
                format!(
                    "shape {:?} in {} does not fit the config, which needs {expected:?}",
                    tensor.shape,
                    source.display()
                ),
            ));
        }
        pack.push(pack_f32(
            &slot.name,
            tensor.f32s(&name)?.to_vec(),
            &expected,
        ));
    }
    apply_all(model, pack)?;
    Ok(tensors)
}

/// Applies tensors that must cover every parameter of `model`.
pub fn apply_all<M: ModuleSnapshot>(
    model: &mut M,
    tensors: Vec<PackTensor>,
) -> Result<(), ModelError> {
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
