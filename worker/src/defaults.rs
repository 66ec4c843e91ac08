//! The embedded defaults: the small stage-1 and stage-2 configs and the Fashion-MNIST shards.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::stage1::Stage1Config;
use crate::stage2::Stage2Config;

/// The embedded default config (configs/stage1/fashion_mnist.yaml).
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/stage1/fashion_mnist.yaml");
/// The embedded default stage-2 config (configs/stage2/fashion_mnist.yaml).
pub const DEFAULT_STAGE2_CONFIG: &str = include_str!("../../configs/stage2/fashion_mnist.yaml");
/// Where the embedded default data lives in a checkout.
pub const DEFAULT_DATA: &str = "data/fashion-mnist";

/// Parses and checks a stage-1 config; `text` empty means the embedded default. Errors name
/// `name` (the file).
pub fn parse_config(text: &str, name: &str) -> Result<Stage1Config> {
    let (text, name) = if text.is_empty() {
        (DEFAULT_CONFIG, "the embedded default config")
    } else {
        (text, name)
    };
    let config: Stage1Config = serde_yaml::from_str(text)
        .with_context(|| format!("{name}: not a valid stage-1 config"))?;
    config
        .validate()
        .with_context(|| format!("{name}: refused"))?;
    Ok(config)
}

/// Parses and checks a stage-2 config; `text` empty means the embedded default. Errors name
/// `name` (the file).
pub fn parse_stage2_config(text: &str, name: &str) -> Result<Stage2Config> {
    let (text, name) = if text.is_empty() {
        (DEFAULT_STAGE2_CONFIG, "the embedded default stage-2 config")
    } else {
        (text, name)
    };
    let config: Stage2Config = serde_yaml::from_str(text)
        .with_context(|| format!("{name}: not a valid stage-2 config"))?;
    config
        .validate()
        .with_context(|| format!("{name}: refused"))?;
    Ok(config)
}

/// `data/fashion-mnist` under the current directory, else in the checkout this was built from.
pub fn default_data() -> Result<PathBuf> {
    let here = PathBuf::from(DEFAULT_DATA);
    if here.is_dir() {
        return Ok(here);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_DATA);
    if checkout.is_dir() {
        return Ok(checkout);
    }
    bail!(
        "no --data given and the embedded data ({DEFAULT_DATA}) is not here; run from the repository root"
    )
}
