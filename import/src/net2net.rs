//! Import of reference Net2NetTransformer checkpoints: the YAML names the GPT
//! (`transformer_config`), the first stage and the cond stage (SOSProvider, Labelator, or a
//! VQGAN for segmentation maps) and the permuter; the Lightning `.ckpt` holds `transformer.*`,
//! `first_stage_model.*` and `cond_stage_model.*` tensors. The reference shares one
//! embedding table between cond and image tokens, so imports keep `cond_offset: 0`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use serde_yaml::Value as Yaml;

use crate::taming::{reference_name, taming_config};
use crate::torch_file::{RawData, RawTensor, TorchCheckpoint};
use taming_model::config::VqganConfig;
use taming_model::error::ModelError;
use taming_model::transformer::{Conditioning, Gpt, GptConfig, PermuterKind, TransformerConfig};
use taming_model::vqgan::Vqgan;

/// A reference stage-2 checkpoint turned into models.
#[derive(Debug)]
pub struct ImportedTransformer {
    /// The transformer's config.
    pub config: TransformerConfig,
    /// The filled GPT.
    pub gpt: Gpt,
    /// The first-stage VQGAN.
    pub first_stage: (VqganConfig, Vqgan),
    /// The cond-stage VQGAN (segmentation conditioning).
    pub cond_stage: Option<(VqganConfig, Vqgan)>,
    /// Checkpoint tensors with no place in these models.
    pub ignored: Vec<String>,
}

fn key_error(key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

fn node<'a>(root: &'a Yaml, path: &str) -> Result<&'a Yaml, ModelError> {
    path.split('.')
        .try_fold(root, |n, k| n.get(k))
        .ok_or_else(|| key_error(path, "missing"))
}

fn value<T: serde::de::DeserializeOwned>(root: &Yaml, path: &str) -> Result<T, ModelError> {
    serde_yaml::from_value(node(root, path)?.clone()).map_err(|e| key_error(path, e.to_string()))
}

fn class_of(target: &str) -> &str {
    target.rsplit('.').next().unwrap_or(target)
}

/// A VQGAN config from a `*_stage_config` node (its `target` and `params`).
fn stage_config(root: &Yaml, path: &str) -> Result<VqganConfig, ModelError> {
    let mut wrapped = serde_yaml::Mapping::new();
    wrapped.insert("model".into(), node(root, path)?.clone());
    taming_config(&Yaml::Mapping(wrapped)).map_err(|e| match e {
        ModelError::Config { key, reason } => key_error(&key.replacen("model", path, 1), reason),
        other => other,
    })
}

fn conditioning(root: &Yaml) -> Result<(Conditioning, Option<VqganConfig>), ModelError> {
    let path = "model.params.cond_stage_config";
    let cond = node(root, path)?;
    if cond.as_str() == Some("__is_unconditional__") {
        return Ok((Conditioning::None { sos_token: 0 }, None));
    }
    let target: String = value(root, &format!("{path}.target"))?;
    match class_of(&target) {
        "SOSProvider" => {
            let sos = cond.get("params").and_then(|p| p.get("sos_token"));
            let sos_token = sos.and_then(Yaml::as_u64).unwrap_or(0) as usize;
            Ok((Conditioning::None { sos_token }, None))
        }
        "Labelator" => {
            let n_classes: usize = value(root, &format!("{path}.params.n_classes"))?;
            Ok((Conditioning::Class { n_classes }, None))
        }
        "VQModel" | "VQSegmentationModel" | "VQNoDiscModel" => {
            let vq = stage_config(root, path)?;
            let cond = Conditioning::Segmentation {
                n_embed: vq.n_embed,
                classes: vq.ddconfig.in_channels,
            };
            Ok((cond, Some(vq)))
        }
        other => Err(key_error(
            &format!("{path}.target"),
            format!("`{other}` is not a supported cond stage (SOSProvider, Labelator, VQModel)"),
        )),
    }
}

fn permuter(root: &Yaml) -> Result<(PermuterKind, Option<[usize; 2]>), ModelError> {
    let path = "model.params.permuter_config";
    let Ok(p) = node(root, path) else {
        return Ok((PermuterKind::Identity, None));
    };
    let target: String = value(p, "target").map_err(|_| key_error(path, "has no target"))?;
    let kind = match class_of(&target) {
        "Identity" => return Ok((PermuterKind::Identity, None)),
        "ZCurve" => PermuterKind::ZCurve,
        "Subsample" => PermuterKind::Subsample,
        other => {
            return Err(key_error(
                &format!("{path}.target"),
                format!("`{other}` is not supported (Identity, ZCurve, Subsample)"),
            ));
        }
    };
    let h: usize = value(root, &format!("{path}.params.H"))?;
    let w: usize = value(root, &format!("{path}.params.W"))?;
    Ok((kind, Some([h, w])))
}

/// The window: `window` if given, else the permuter's grid, else the first stage's token
/// grid if the GPT's block holds it, else the reference's 16x16.
fn pick_window(
    given: Option<[usize; 2]>,
    permuter: Option<[usize; 2]>,
    first: &VqganConfig,
    fits: impl Fn([usize; 2]) -> bool,
) -> Result<[usize; 2], ModelError> {
    if let Some(w) = given.or(permuter) {
        return Ok(w);
    }
    let side = first.ddconfig.resolution >> (first.ddconfig.ch_mult.len() - 1);
    [[side, side], [16, 16]]
        .into_iter()
        .find(|&w| fits(w))
        .ok_or_else(|| {
            key_error(
                "model.params.transformer_config.params.block_size",
                "holds neither the first stage's token grid nor a 16x16 window: give the window",
            )
        })
}

/// The reference's name for one of our GPT parameter paths.
pub fn gpt_reference_name(ours: &str) -> String {
    let name = reference_name(ours)
        .replace(".mlp_fc.", ".mlp.0.")
        .replace(".mlp_proj.", ".mlp.2.");
    format!("transformer.{name}")
}

/// PyTorch stores Linear weights `[out, in]`, burn `[in, out]`: transposes every 2-d
/// `.weight` of the transformer except the embedding.
fn transpose_linear_weights(tensors: &mut BTreeMap<String, RawTensor>) {
    for (name, t) in tensors.iter_mut() {
        let linear = name.starts_with("transformer.")
            && name.ends_with(".weight")
            && t.shape.len() == 2
            && name != "transformer.tok_emb.weight";
        if let (true, RawData::F32(v)) = (linear, &t.data) {
            let [r, c] = [t.shape[0], t.shape[1]];
            let mut out = vec![0f32; v.len()];
            for i in 0..r {
                for j in 0..c {
                    out[j * r + i] = v[i * c + j];
                }
            }
            t.data = RawData::F32(out);
            t.shape = vec![c, r];
        }
    }
}

/// Imports a reference Net2NetTransformer (YAML config and Lightning checkpoint).
/// `window` overrides the training window in tokens.
pub fn import_net2net(
    yaml: &Path,
    ckpt: &Path,
    window: Option<[usize; 2]>,
    device: &Device,
) -> Result<ImportedTransformer, ModelError> {
    let text = std::fs::read_to_string(yaml).map_err(|e| ModelError::io(yaml, e))?;
    let root: Yaml = serde_yaml::from_str(&text)
        .map_err(|e| ModelError::file(yaml, format!("not valid YAML: {e}")))?;
    let gpt_path = "model.params.transformer_config.params";
    let gpt_cfg = GptConfig {
        vocab_size: value(&root, &format!("{gpt_path}.vocab_size"))?,
        block_size: value(&root, &format!("{gpt_path}.block_size"))?,
        n_layer: value(&root, &format!("{gpt_path}.n_layer"))?,
        n_head: value(&root, &format!("{gpt_path}.n_head"))?,
        n_embd: value(&root, &format!("{gpt_path}.n_embd"))?,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        attn_pdrop: 0.0,
    };
    let first = stage_config(&root, "model.params.first_stage_config")?;
    let (cond, cond_vq) = conditioning(&root)?;
    let (permuter, perm_grid) = permuter(&root)?;
    let pkeep = node(&root, "model.params.pkeep")
        .ok()
        .and_then(Yaml::as_f64)
        .unwrap_or(1.0);
    let make = |w: [usize; 2]| TransformerConfig {
        gpt: gpt_cfg.clone(),
        n_embed: first.n_embed,
        window: w,
        cond: cond.clone(),
        cond_offset: Some(0),
        pkeep,
        permuter,
    };
    let window = pick_window(window, perm_grid, &first, |w| make(w).validate().is_ok())?;
    let config = make(window);
    config.validate()?;
    let mut tensors = TorchCheckpoint::open(ckpt)?.state_dict()?;
    transpose_linear_weights(&mut tensors);
    let mut gpt = Gpt::new(&config.gpt, device);
    let tensors = taming_model::checkpoint::fill_from(&mut gpt, tensors, gpt_reference_name, ckpt)?;
    let mut first_model = Vqgan::new(&first, device)?;
    let prefixed = |p: &'static str| move |n: &str| format!("{p}{}", reference_name(n));
    let mut tensors = taming_model::checkpoint::fill_from(
        &mut first_model,
        tensors,
        prefixed("first_stage_model."),
        ckpt,
    )?;
    let cond_stage = match cond_vq {
        Some(cfg) => {
            let mut model = Vqgan::new(&cfg, device)?;
            tensors = taming_model::checkpoint::fill_from(
                &mut model,
                tensors,
                prefixed("cond_stage_model."),
                ckpt,
            )?;
            Some((cfg, model))
        }
        None => None,
    };
    let ignored = tensors
        .into_keys()
        .filter(|k| !k.ends_with(".attn.mask") && !k.starts_with("permuter."))
        .collect();
    Ok(ImportedTransformer {
        config,
        gpt,
        first_stage: (first, first_model),
        cond_stage,
        ignored,
    })
}
