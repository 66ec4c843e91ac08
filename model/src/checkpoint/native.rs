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

use super::tensors::{RawData, RawTensor};
use crate::config::VqganConfig;
use crate::error::ModelError;
use crate::transformer::{Gpt, TransformerConfig};
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
    staged(out, overwrite, |dir| write_dir(dir, config, model, loss))
}

/// Runs `write` on a staging directory beside `out` and renames it into place; the staging
/// directory is removed on failure.
fn staged(
    out: &Path,
    overwrite: bool,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    if out.exists() && !overwrite {
        return Err(ModelError::file(
            out,
            "already exists (pass --force to replace it)",
        ));
    }
    let staging = sibling(out, "partial");
    let _ = fs::remove_dir_all(&staging);
    let result = write(&staging).and_then(|()| swap_into_place(&staging, out));
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

/// Writes any module with its config to the directory `out` (replacing it when
/// `overwrite`), through a staging directory renamed into place.
pub fn save_module_dir<M: ModuleSnapshot>(
    out: &Path,
    config: &impl serde::Serialize,
    module: &M,
    overwrite: bool,
) -> Result<(), ModelError> {
    staged(out, overwrite, |dir| {
        write_config_and_weights(dir, config, module)
    })
}

fn write_config_and_weights<M: ModuleSnapshot>(
    dir: &Path,
    config: &impl serde::Serialize,
    module: &M,
) -> Result<(), ModelError> {
    fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    let config_path = dir.join(CONFIG_FILE);
    fs::write(&config_path, json).map_err(|e| ModelError::io(&config_path, e))?;
    let mut tensors = Vec::new();
    for t in module.collect(None, None, true) {
        let shape = t.shape.to_vec();
        let name = t.name.clone();
        let bytes = t
            .into_bytes()
            .map_err(|e| ModelError::tensor(&name, e.to_string()))?;
        tensors.push((name, Dtype::F32, shape, bytes.to_vec()));
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)
}

fn write_dir(
    dir: &Path,
    config: &VqganConfig,
    model: &Vqgan,
    loss: &BTreeMap<String, RawTensor>,
) -> Result<(), ModelError> {
    write_config_and_weights(dir, config, model)?;
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
    load_weights(dir, &mut model)?;
    Ok((config, model))
}

/// Fills every parameter of `module` from `model.safetensors` in `dir`; errors name the
/// tensor and the file.
pub fn load_weights<M: ModuleSnapshot>(dir: &Path, module: &mut M) -> Result<(), ModelError> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::file(&path, format!("not a readable safetensors file ({e})")))?;
    let mut pack = Vec::new();
    for slot in module.collect(None, None, true) {
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
    super::apply_all(module, pack)
}

/// Reads and validates `config.json` of a VQGAN model directory.
pub fn read_config(dir: &Path) -> Result<VqganConfig, ModelError> {
    let config: VqganConfig = read_json_config(dir)?;
    config.validate()?;
    Ok(config)
}

/// Parses `config.json` of a model directory; errors name the file.
pub fn read_json_config<C: serde::de::DeserializeOwned>(dir: &Path) -> Result<C, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::file(&path, e.to_string()))
}

/// Writes a stage-2 transformer (its config and GPT) to the directory `out`.
pub fn save_transformer(
    out: &Path,
    config: &TransformerConfig,
    gpt: &Gpt,
    overwrite: bool,
) -> Result<(), ModelError> {
    save_module_dir(out, config, gpt, overwrite)
}

/// Reads a transformer directory written by [`save_transformer`].
pub fn load_transformer(
    dir: &Path,
    device: &Device,
) -> Result<(TransformerConfig, Gpt), ModelError> {
    let config: TransformerConfig = read_json_config(dir)?;
    config.validate()?;
    let mut gpt = Gpt::new(&config.gpt, device);
    load_weights(dir, &mut gpt)?;
    Ok((config, gpt))
}
