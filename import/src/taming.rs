//! Import of reference (CompVis taming-transformers) checkpoints: the YAML config
//! (`model.params.ddconfig`, `n_embed`, `embed_dim`, the target class) and the Lightning
//! `.ckpt` whose `state_dict` fills a [`Vqgan`]. Loss-module tensors (`loss.*`:
//! discriminator, LPIPS) are returned separately when present.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use serde_yaml::Value as Yaml;

use crate::torch_file::{RawTensor, TorchCheckpoint};
use taming_model::config::{
    DdConfig, EmaConfig, GumbelConfig, QuantizerConfig, TemperatureSchedule, VectorQuantizerConfig,
    VqganConfig,
};
use taming_model::error::ModelError;
use taming_model::vqgan::Vqgan;

/// Keys every reference `ddconfig` must name (the others have reference defaults).
const REQUIRED_DD_KEYS: [&str; 8] = [
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "in_channels",
    "resolution",
    "z_channels",
];

/// A reference checkpoint turned into a model.
#[derive(Debug)]
pub struct Imported {
    /// The model's config, derived from the YAML.
    pub config: VqganConfig,
    /// The filled model.
    pub model: Vqgan,
    /// `loss.*` tensors (discriminator, LPIPS), empty when the checkpoint has none.
    pub loss_tensors: BTreeMap<String, RawTensor>,
    /// Other checkpoint tensors the model has no place for.
    pub ignored: Vec<String>,
    /// The checkpoint's `global_step`, if recorded.
    pub global_step: Option<i64>,
}

/// Reads a reference YAML config into a [`VqganConfig`]; errors name the missing or bad key.
pub fn read_taming_yaml(path: &Path) -> Result<VqganConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let root: Yaml = serde_yaml::from_str(&text)
        .map_err(|e| ModelError::file(path, format!("not valid YAML: {e}")))?;
    taming_config(&root)
}

fn missing(key: &str) -> ModelError {
    ModelError::Config {
        key: key.to_string(),
        reason: "missing".into(),
    }
}

fn get<'a>(node: &'a Yaml, parent: &str, key: &str) -> Result<&'a Yaml, ModelError> {
    node.get(key)
        .ok_or_else(|| missing(&format!("{parent}.{key}")))
}

fn number<T: serde::de::DeserializeOwned>(node: &Yaml, key: &str) -> Result<T, ModelError> {
    serde_yaml::from_value(node.clone()).map_err(|e| ModelError::Config {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Converts the parsed YAML (with `model.target` and `model.params`) into a config.
pub fn taming_config(root: &Yaml) -> Result<VqganConfig, ModelError> {
    let model = get(root, "", "model").map_err(|_| missing("model"))?;
    let target: String = number(get(model, "model", "target")?, "model.target")?;
    let params = get(model, "model", "params")?;
    let dd_node = get(params, "model.params", "ddconfig")?;
    for key in REQUIRED_DD_KEYS {
        get(dd_node, "model.params.ddconfig", key)?;
    }
    let ddconfig: DdConfig =
        serde_yaml::from_value(dd_node.clone()).map_err(|e| ModelError::Config {
            key: "model.params.ddconfig".into(),
            reason: e.to_string(),
        })?;
    let n_embed: i64 = number(
        get(params, "model.params", "n_embed")?,
        "model.params.n_embed",
    )?;
    let embed_dim: i64 = number(
        get(params, "model.params", "embed_dim")?,
        "model.params.embed_dim",
    )?;
    let positive = |v: i64, key: &str| {
        usize::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| ModelError::Config {
                key: key.into(),
                reason: format!("{v} must be a positive integer"),
            })
    };
    let config = VqganConfig {
        ddconfig,
        n_embed: positive(n_embed, "model.params.n_embed")?,
        embed_dim: positive(embed_dim, "model.params.embed_dim")?,
        quantizer: quantizer_for(&target, params)?,
    };
    config.validate()?;
    Ok(config)
}

fn quantizer_for(target: &str, params: &Yaml) -> Result<QuantizerConfig, ModelError> {
    let class = target.rsplit('.').next().unwrap_or(target);
    // The reference's VectorQuantizer(2) puts beta on the codebook term: keep that on import.
    let legacy = VectorQuantizerConfig {
        legacy: true,
        ..VectorQuantizerConfig::default()
    };
    match class {
        "VQModel" | "VQSegmentationModel" | "VQNoDiscModel" => Ok(QuantizerConfig::Vector(legacy)),
        "EMAVQ" => Ok(QuantizerConfig::Vector(VectorQuantizerConfig {
            ema: Some(EmaConfig::default()),
            ..legacy
        })),
        "GumbelVQ" => gumbel_config(params).map(QuantizerConfig::Gumbel),
        _ => Err(ModelError::Config {
            key: "model.target".into(),
            reason: format!(
                "`{target}` is not a supported first-stage model (VQModel, GumbelVQ, EMAVQ, VQSegmentationModel)"
            ),
        }),
    }
}

fn gumbel_config(params: &Yaml) -> Result<GumbelConfig, ModelError> {
    let mut cfg = GumbelConfig::default();
    if let Some(w) = params.get("kl_weight") {
        cfg.kl_weight = number(w, "model.params.kl_weight")?;
    }
    if let Some(sched) = params
        .get("temperature_scheduler_config")
        .and_then(|s| s.get("params"))
    {
        let key = "model.params.temperature_scheduler_config.params";
        let field = |name: &str| -> Result<f64, ModelError> {
            number(get(sched, key, name)?, &format!("{key}.{name}"))
        };
        cfg.temperature = TemperatureSchedule {
            warm_up_steps: field("warm_up_steps")? as u64,
            max_decay_steps: field("max_decay_steps")? as u64,
            start: field("lr_start")?,
            max: field("lr_max")?,
            min: field("lr_min")?,
        };
    }
    Ok(cfg)
}

/// The reference's name for one of our parameter paths.
pub fn reference_name(ours: &str) -> String {
    let name = ours.replace(".gamma", ".weight").replace(".beta", ".bias");
    name.replace("quantize.ema.", "quantize.embedding.")
}

/// Imports a reference YAML config and Lightning checkpoint.
pub fn import_taming(config: &Path, ckpt: &Path, device: &Device) -> Result<Imported, ModelError> {
    let config = read_taming_yaml(config)?;
    let mut file = TorchCheckpoint::open(ckpt)?;
    let global_step = file.root().get("global_step").and_then(|v| v.as_int());
    let tensors = file.state_dict()?;
    let mut model = Vqgan::new(&config, device)?;
    let tensors = taming_model::checkpoint::fill_from(&mut model, tensors, reference_name, ckpt)?;
    let (loss_tensors, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = tensors
        .into_iter()
        .partition(|(k, _)| k.starts_with("loss."));
    Ok(Imported {
        config,
        model,
        loss_tensors,
        ignored: rest.into_keys().collect(),
        global_step,
    })
}
