//! VQGAN configuration: the reference's `ddconfig`, the codebook and the quantizer choice.
//!
//! [`DdConfig`] mirrors `taming.modules.diffusionmodules.model.Encoder`'s arguments with the
//! reference's defaults; [`VqganConfig`] adds `n_embed`, `embed_dim` and the quantizer.
//! Configs are checked with [`VqganConfig::validate`] before any module is built.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Encoder/decoder shape, named and defaulted exactly as the reference's `ddconfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdConfig {
    /// Base channel count; level `i` has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// Output image channels of the decoder.
    pub out_ch: usize,
    /// Channel multipliers, one per resolution level.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Resolutions (in pixels of the feature map) that get an attention block.
    pub attn_resolutions: Vec<usize>,
    /// Dropout inside residual blocks.
    #[serde(default)]
    pub dropout: f64,
    /// Convolutional (true) or pooled/plain (false) resampling.
    #[serde(default = "default_true")]
    pub resamp_with_conv: bool,
    /// Input image channels.
    pub in_channels: usize,
    /// Training resolution in pixels (fixes where attention happens).
    pub resolution: usize,
    /// Latent channels.
    pub z_channels: usize,
    /// Encoder emits `2 * z_channels` (only meaningful for KL autoencoders).
    #[serde(default = "default_true")]
    pub double_z: bool,
}

fn default_true() -> bool {
    true
}

/// Which quantizer sits between `quant_conv` and `post_quant_conv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QuantizerConfig {
    /// Nearest-neighbour vector quantization (VQModel), with optional extensions.
    Vector(VectorQuantizerConfig),
    /// Gumbel-softmax quantization (GumbelVQ).
    Gumbel(GumbelConfig),
    /// Finite scalar quantization: `embed_dim` channels, each rounded to its number of levels;
    /// `n_embed` is the product of the levels.
    Fsq(FsqConfig),
    /// SimVQ: a frozen random codebook through one learned linear layer.
    Simvq(SimVqConfig),
    /// Lookup-free quantization: `embed_dim` sign bits, `n_embed = 2^embed_dim`.
    Lfq(LfqConfig),
}

/// Lookup-free quantization settings (vector-quantize-pytorch's defaults but a commitment
/// weight of 0.25).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LfqConfig {
    /// Weight of the entropy terms.
    pub entropy_weight: f64,
    /// Weight of the codebook entropy within them.
    pub diversity_gamma: f64,
    /// Weight of `|x - sg[q]|^2`.
    pub commitment_weight: f64,
    /// Inverse temperature of the code distribution the entropies are taken of.
    pub inv_temperature: f64,
}

impl Default for LfqConfig {
    fn default() -> Self {
        Self {
            entropy_weight: 0.1,
            diversity_gamma: 1.0,
            commitment_weight: 0.25,
            inv_temperature: 100.0,
        }
    }
}

/// The most sign bits LFQ takes: its entropy terms hold a probability per code and token.
pub const MAX_LFQ_BITS: usize = 16;

impl LfqConfig {
    fn validate(&self, n_embed: usize, embed_dim: usize) -> Result<(), ModelError> {
        let bad = |key: &str, reason: String| ModelError::Config {
            key: key.into(),
            reason,
        };
        if embed_dim > MAX_LFQ_BITS {
            return Err(bad(
                "embed_dim",
                format!("{embed_dim} sign bits; LFQ takes at most {MAX_LFQ_BITS}"),
            ));
        }
        if n_embed != 1 << embed_dim {
            return Err(bad(
                "n_embed",
                format!("{n_embed}, but LFQ with embed_dim {embed_dim} has 2^{embed_dim} codes"),
            ));
        }
        let weights = [
            ("entropy_weight", self.entropy_weight),
            ("diversity_gamma", self.diversity_gamma),
            ("commitment_weight", self.commitment_weight),
            ("inv_temperature", self.inv_temperature),
        ];
        for (key, v) in weights {
            if v.is_nan() || v < 0.0 {
                return Err(bad(
                    &format!("quantizer.{key}"),
                    format!("{v} must be >= 0"),
                ));
            }
        }
        Ok(())
    }
}

/// SimVQ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimVqConfig {
    /// Commitment weight (vector-quantize-pytorch's `input_to_quantize_commit_loss_weight`).
    pub beta: f64,
    /// How gradients pass to the encoder (the rotation trick by default, as in
    /// vector-quantize-pytorch).
    pub estimator: Estimator,
}

impl Default for SimVqConfig {
    fn default() -> Self {
        Self {
            beta: 0.25,
            estimator: Estimator::Rotation,
        }
    }
}

/// Finite scalar quantization settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsqConfig {
    /// Levels per latent channel, each at least 3 (e.g. `[8, 5, 5, 5]`: 1,000 codes; the FSQ
    /// paper's `[8, 8, 8, 5, 5, 5]`: 64,000).
    pub levels: Vec<usize>,
}

impl FsqConfig {
    fn validate(&self, n_embed: usize, embed_dim: usize) -> Result<(), ModelError> {
        let bad = |key: &str, reason: String| ModelError::Config {
            key: key.into(),
            reason,
        };
        if let Some(l) = self.levels.iter().find(|&&l| l < 3) {
            return Err(bad(
                "quantizer.levels",
                format!("{l} levels: each channel needs at least 3"),
            ));
        }
        if self.levels.len() != embed_dim {
            return Err(bad(
                "embed_dim",
                format!(
                    "{embed_dim}, but FSQ with {} levels quantizes {} channels",
                    self.levels.len(),
                    self.levels.len()
                ),
            ));
        }
        let codes = self
            .levels
            .iter()
            .try_fold(1usize, |p, &l| p.checked_mul(l))
            .filter(|&p| p <= 1 << 24);
        if codes != Some(n_embed) {
            return Err(bad(
                "n_embed",
                format!(
                    "{n_embed}, but FSQ levels {:?} make {} codes",
                    self.levels,
                    codes.map_or("over 2^24".into(), |c| c.to_string())
                ),
            ));
        }
        Ok(())
    }
}

impl Default for QuantizerConfig {
    fn default() -> Self {
        Self::Vector(VectorQuantizerConfig::default())
    }
}

/// Nearest-code quantizer and the codebook-collapse remedies layered on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VectorQuantizerConfig {
    /// Commitment weight.
    pub beta: f64,
    /// The reference's swapped loss (`beta` on the codebook term instead of the commitment term).
    pub legacy: bool,
    /// Compare l2-normalized vectors (cosine similarity) instead of raw ones.
    pub cosine: bool,
    /// Look codes up in a projected space of this many dimensions (e.g. 8).
    pub codebook_dim: Option<usize>,
    /// Update the codebook by exponential moving averages instead of gradients.
    pub ema: Option<EmaConfig>,
    /// Initialize the codebook with k-means over the first training batches.
    pub kmeans_init: Option<KmeansConfig>,
    /// Restart codes whose use falls under a threshold with vectors from the batch.
    pub dead_code_restart: Option<RestartConfig>,
    /// Number of recent tokens over which codebook usage is reported.
    pub usage_window: usize,
    /// How gradients pass the quantizer to the encoder.
    pub estimator: Estimator,
}

/// The gradient estimator of the vector quantizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// The gradient of the quantized latent is the latent's (the reference's).
    #[default]
    StraightThrough,
    /// The rotation trick (Fifty et al. 2024): the latent is rotated and scaled onto its code,
    /// the gradient passes through that (detached) linear map, so that it carries the angle
    /// and norm between latent and code.
    Rotation,
}

impl Default for VectorQuantizerConfig {
    fn default() -> Self {
        Self {
            beta: 0.25,
            legacy: false,
            cosine: false,
            codebook_dim: None,
            ema: None,
            kmeans_init: None,
            dead_code_restart: None,
            usage_window: 65_536,
            estimator: Estimator::StraightThrough,
        }
    }
}

/// EMA codebook update settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Moving-average decay.
    pub decay: f64,
    /// Laplace smoothing of the cluster sizes.
    pub eps: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.99,
            eps: 1e-5,
        }
    }
}

/// k-means initialization settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmeansConfig {
    /// Lloyd iterations.
    pub iters: usize,
    /// Training batches whose latents are pooled before clustering.
    pub batches: usize,
}

impl Default for KmeansConfig {
    fn default() -> Self {
        Self {
            iters: 10,
            batches: 1,
        }
    }
}

/// Dead-code restart settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// A code whose EMA use count (tokens per step) falls under this is restarted.
    pub threshold: f64,
    /// Decay of the use-count moving average.
    pub decay: f64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            threshold: 1.0,
            decay: 0.99,
        }
    }
}

/// Gumbel quantizer settings (the reference's GumbelQuantize and its temperature schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GumbelConfig {
    /// Weight of the KL-to-uniform prior term.
    pub kl_weight: f64,
    /// Hard one-hot with straight-through gradients while training.
    pub straight_through: bool,
    /// Temperature schedule over training steps.
    pub temperature: TemperatureSchedule,
}

impl Default for GumbelConfig {
    fn default() -> Self {
        Self {
            kl_weight: 1e-8,
            straight_through: true,
            temperature: TemperatureSchedule::default(),
        }
    }
}

/// The reference's `LambdaWarmUpCosineScheduler` applied to the Gumbel temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemperatureSchedule {
    /// Linear warm-up steps from `start` to `max`.
    pub warm_up_steps: u64,
    /// Steps of cosine decay from `max` to `min` after warm-up.
    pub max_decay_steps: u64,
    /// Temperature at step 0.
    pub start: f64,
    /// Temperature at the end of warm-up.
    pub max: f64,
    /// Temperature after decay.
    pub min: f64,
}

impl Default for TemperatureSchedule {
    fn default() -> Self {
        Self {
            warm_up_steps: 0,
            max_decay_steps: 1_000_001,
            start: 0.9,
            max: 0.9,
            min: 1e-6,
        }
    }
}

impl TemperatureSchedule {
    /// Temperature at training step `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warm_up_steps {
            let slope = (self.max - self.start) / self.warm_up_steps as f64;
            return self.start + slope * step as f64;
        }
        let span = self
            .max_decay_steps
            .saturating_sub(self.warm_up_steps)
            .max(1) as f64;
        let t = ((step - self.warm_up_steps) as f64 / span).min(1.0);
        self.min + 0.5 * (self.max - self.min) * (1.0 + (t * std::f64::consts::PI).cos())
    }
}

/// A whole first-stage model: autoencoder shape, codebook size and quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqganConfig {
    /// Encoder/decoder shape.
    pub ddconfig: DdConfig,
    /// Number of codes.
    pub n_embed: usize,
    /// Code vector dimension (channels after `quant_conv`).
    pub embed_dim: usize,
    /// Quantizer and its options.
    #[serde(default)]
    pub quantizer: QuantizerConfig,
}

/// Number of groups of every GroupNorm in the autoencoder.
pub const NORM_GROUPS: usize = 32;

impl DdConfig {
    /// The reference's ImageNet f16 autoencoder (configs/imagenet_vqgan.yaml): ch 128,
    /// ch_mult `[1,1,2,2,4]`, 2 residual blocks, attention at 16, z 256, 256x256.
    pub fn imagenet_f16() -> Self {
        Self {
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.0,
            resamp_with_conv: true,
            in_channels: 3,
            resolution: 256,
            z_channels: 256,
            double_z: false,
        }
    }

    /// Spatial downsampling factor between image and latent grid.
    pub fn downsample_factor(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Feature-map resolution of level `i` at the training resolution.
    pub fn level_resolution(&self, level: usize) -> usize {
        self.resolution >> level
    }

    /// Channels of the encoder's output (`2 * z_channels` when `double_z`).
    pub fn encoder_out_channels(&self) -> usize {
        if self.double_z {
            2 * self.z_channels
        } else {
            self.z_channels
        }
    }

    /// Checks that this shape can be built; errors name the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &str, why: String| ModelError::Config {
            key: format!("ddconfig.{key}"),
            reason: why,
        };
        for (key, value) in [
            ("ch", self.ch),
            ("out_ch", self.out_ch),
            ("in_channels", self.in_channels),
            ("resolution", self.resolution),
            ("z_channels", self.z_channels),
            ("num_res_blocks", self.num_res_blocks),
        ] {
            if value == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return Err(bad(
                "ch_mult",
                "must be a non-empty list of positive integers".into(),
            ));
        }
        for (level, mult) in self.ch_mult.iter().enumerate() {
            let channels = self.ch * mult;
            if !channels.is_multiple_of(NORM_GROUPS) {
                return Err(bad(
                    "ch_mult",
                    format!(
                        "level {level} has ch*ch_mult = {channels} channels, \
                         not a multiple of the {NORM_GROUPS} GroupNorm groups"
                    ),
                ));
            }
        }
        let factor = self.downsample_factor();
        if !self.resolution.is_multiple_of(factor) {
            return Err(bad(
                "resolution",
                format!(
                    "{} is not divisible by the downsampling factor {factor}",
                    self.resolution
                ),
            ));
        }
        let reached: Vec<usize> = (0..self.ch_mult.len())
            .map(|l| self.level_resolution(l))
            .collect();
        for res in &self.attn_resolutions {
            if !reached.contains(res) {
                return Err(bad(
                    "attn_resolutions",
                    format!("{res} is never reached; the levels run at {reached:?}"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("{} is outside [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }
}

impl VqganConfig {
    /// The reference's ImageNet f16 VQGAN with 1024 codes of dimension 256.
    pub fn imagenet_f16_1024() -> Self {
        Self {
            ddconfig: DdConfig::imagenet_f16(),
            n_embed: 1024,
            embed_dim: 256,
            quantizer: QuantizerConfig::default(),
        }
    }

    /// Checks the whole model config; errors name the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.ddconfig.validate()?;
        let bad = |key: &str, reason: String| ModelError::Config {
            key: key.to_string(),
            reason,
        };
        if self.ddconfig.double_z {
            return Err(bad(
                "ddconfig.double_z",
                "must be false for a VQ model (quant_conv takes z_channels inputs)".into(),
            ));
        }
        if self.n_embed == 0 {
            return Err(bad("n_embed", "must be positive".into()));
        }
        if self.embed_dim == 0 {
            return Err(bad("embed_dim", "must be positive".into()));
        }
        match &self.quantizer {
            QuantizerConfig::Vector(vq) => vq.validate(self.embed_dim),
            QuantizerConfig::Gumbel(g) => g.validate(),
            QuantizerConfig::Fsq(f) => f.validate(self.n_embed, self.embed_dim),
            QuantizerConfig::Simvq(c) if c.beta.is_nan() || c.beta < 0.0 => {
                Err(ModelError::Config {
                    key: "quantizer.beta".into(),
                    reason: format!("{} must be >= 0", c.beta),
                })
            }
            QuantizerConfig::Simvq(_) => Ok(()),
            QuantizerConfig::Lfq(c) => c.validate(self.n_embed, self.embed_dim),
        }
    }
}

impl VectorQuantizerConfig {
    fn validate(&self, embed_dim: usize) -> Result<(), ModelError> {
        let bad = |key: &str, reason: String| ModelError::Config {
            key: format!("quantizer.{key}"),
            reason,
        };
        if self.beta.is_nan() || self.beta < 0.0 {
            return Err(bad("beta", format!("{} must be >= 0", self.beta)));
        }
        if let Some(dim) = self.codebook_dim
            && (dim == 0 || dim > embed_dim)
        {
            return Err(bad(
                "codebook_dim",
                format!("{dim} must be in 1..={embed_dim}"),
            ));
        }
        if let Some(ema) = &self.ema {
            if !(0.0..1.0).contains(&ema.decay) {
                return Err(bad("ema.decay", format!("{} is outside [0, 1)", ema.decay)));
            }
            if ema.eps.is_nan() || ema.eps <= 0.0 {
                return Err(bad("ema.eps", format!("{} must be > 0", ema.eps)));
            }
        }
        if let Some(k) = &self.kmeans_init
            && (k.iters == 0 || k.batches == 0)
        {
            return Err(bad(
                "kmeans_init",
                "iters and batches must be positive".into(),
            ));
        }
        if let Some(r) = &self.dead_code_restart
            && !(0.0..1.0).contains(&r.decay)
        {
            return Err(bad(
                "dead_code_restart.decay",
                format!("{} is outside [0, 1)", r.decay),
            ));
        }
        if self.usage_window == 0 {
            return Err(bad("usage_window", "must be positive".into()));
        }
        Ok(())
    }
}

impl GumbelConfig {
    fn validate(&self) -> Result<(), ModelError> {
        let t = &self.temperature;
        if !(t.min > 0.0 && t.max > 0.0 && t.start > 0.0) {
            return Err(ModelError::Config {
                key: "quantizer.temperature".into(),
                reason: "start, max and min must be positive".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_imagenet() -> DdConfig {
        DdConfig::imagenet_f16()
    }

    #[test]
    fn imagenet_config_is_valid_with_factor_16() {
        let dd = f16_imagenet();
        dd.validate().unwrap();
        assert_eq!(dd.downsample_factor(), 16);
    }

    #[test]
    fn unreached_attention_resolution_is_named() {
        let mut dd = f16_imagenet();
        dd.attn_resolutions = vec![24];
        let err = dd.validate().unwrap_err().to_string();
        assert!(err.contains("ddconfig.attn_resolutions"), "{err}");
        assert!(err.contains("24"), "{err}");
    }

    #[test]
    fn channels_not_divisible_by_groups_are_refused() {
        let mut dd = f16_imagenet();
        dd.ch = 48;
        let err = dd.validate().unwrap_err().to_string();
        assert!(err.contains("ddconfig.ch_mult"), "{err}");
    }

    #[test]
    fn zero_codes_are_refused() {
        let cfg = VqganConfig {
            ddconfig: DdConfig {
                double_z: false,
                ..f16_imagenet()
            },
            n_embed: 0,
            embed_dim: 256,
            quantizer: QuantizerConfig::default(),
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("n_embed"), "{err}");
    }

    #[test]
    fn temperature_schedule_follows_warmup_then_cosine() {
        let s = TemperatureSchedule {
            warm_up_steps: 10,
            max_decay_steps: 110,
            start: 0.0,
            max: 1.0,
            min: 0.0,
        };
        assert!((s.at(5) - 0.5).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.5).abs() < 1e-12);
        assert!(s.at(500).abs() < 1e-12);
    }
}
