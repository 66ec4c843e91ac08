//! The project's own model format: a directory with `config.json` (a [`VqganConfig`]),
//! `model.safetensors` (parameters under their module paths) and, when an import carried
//! them, `loss.safetensors` (discriminator and LPIPS tensors under their reference names).
//! A directory is written beside its destination and renamed into place, so a partly
//! written model is never visible under its final name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::store::ModuleSnapshot;
use burn::tensor::Device;
use safetensors::tensor::{Dtype, TensorView};

use super::torch_file::{RawData, RawTensor};
use crate::config::VqganConfig;
use crate::error::ModelError;
use crate::vqgan::Vqgan;

/// File holding the config inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File holding the parameters inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File holding loss-module tensors inside a model directory.
pub const LOSS_FILE: &str = "loss.safetensors";

/// Writes `model` and `config` (and `loss` tensors when non-empty) to the directory `out`.
/// Refuses to replace an existing `out` unless `overwrite`.
pub fn save_model(
    out: &Path,
    config: &VqganConfig,
    model: &Vqgan,
    loss: &BTreeMap<String, RawTensor>,
    overwrite: bool,
) -> Result<(), ModelError> {
    if out.exists() && !overwrite {
        return Err(ModelError::file(
            out,
            "already exists (pass --force to replace it)",
        ));
    }
    let staging = sibling(out, "partial");
    let _ = fs::remove_dir_all(&staging);
    let result =
        write_dir(&staging, config, model, loss).and_then(|()| swap_into_place(&staging, out));
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn sibling(out: &Path, tag: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

fn write_dir(
    dir: &Path,
    config: &VqganConfig,
    model: &Vqgan,
    loss: &BTreeMap<String, RawTensor>,
) -> Result<(), ModelError> {
    fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    let config_path = dir.join(CONFIG_FILE);
    fs::write(&config_path, json).map_err(|e| ModelError::io(&config_path, e))?;
    let mut tensors = Vec::new();
    for t in model.collect(None, None, true) {
        let shape = t.shape.to_vec();
        let name = t.name.clone();
        let bytes = t
            .into_bytes()
            .map_err(|e| ModelError::tensor(&name, e.to_string()))?;
        tensors.push((name, Dtype::F32, shape, bytes.to_vec()));
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)?;
    if !loss.is_empty() {
        let tensors = loss
            .iter()
            .map(|(name, t)| (name.clone(), raw_dtype(t), t.shape.clone(), raw_bytes(t)))
            .collect();
        write_safetensors(&dir.join(LOSS_FILE), tensors)?;
    }
    Ok(())
}

fn raw_dtype(t: &RawTensor) -> Dtype {
    match t.data {
        RawData::F32(_) => Dtype::F32,
        RawData::I64(_) => Dtype::I64,
    }
}

fn raw_bytes(t: &RawTensor) -> Vec<u8> {
    match &t.data {
        RawData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        RawData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

type NamedBytes = (String, Dtype, Vec<usize>, Vec<u8>);

fn write_safetensors(path: &Path, tensors: Vec<NamedBytes>) -> Result<(), ModelError> {
    let mut views = Vec::new();
    for (name, dtype, shape, bytes) in &tensors {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| ModelError::tensor(name, e.to_string()))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| ModelError::file(path, e.to_string()))
}

fn swap_into_place(staging: &Path, out: &Path) -> Result<(), ModelError> {
    if out.exists() {
        let old = sibling(out, "old");
        fs::rename(out, &old).map_err(|e| ModelError::io(out, e))?;
        fs::rename(staging, out).map_err(|e| ModelError::io(out, e))?;
        let _ = fs::remove_dir_all(old);
        return Ok(());
    }
    fs::rename(staging, out).map_err(|e| ModelError::io(out, e))
}

/// Reads a model directory written by [`save_model`].
pub fn load_model(dir: &Path, device: &Device) -> Result<(VqganConfig, Vqgan), ModelError> {
    let config = read_config(dir)?;
    let mut model = Vqgan::new(&config, device)?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::file(&path, format!("not a readable safetensors file ({e})")))?;
    let mut pack = Vec::new();
    for slot in model.collect(None, None, true) {
        let expected = slot.shape.to_vec();
        let view = file.tensor(&slot.name).map_err(|_| {
            ModelError::tensor(&slot.name, format!("missing from {}", path.display()))
        })?;
        if view.shape() != expected.as_slice() || view.dtype() != Dtype::F32 {
            return Err(ModelError::tensor(
                &slot.name,
                format!(
                    "{:?} {:?} in {} does not fit the config, which needs F32 {expected:?}",
                    view.dtype(),
                    view.shape(),
                    path.display()
                ),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        pack.push(super::pack_f32(&slot.name, values, &expected));
    }
    super::apply_all(&mut model, pack)?;
    Ok((config, model))
}

/// Reads and validates `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<VqganConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: VqganConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e.to_string()))?;
    config.validate()?;
    Ok(config)
}
