//! Stage-1 training settings: the model, the loss, and the optimization recipe.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use taming_model::VqganConfig;
use taming_model::error::ModelError;
use taming_model::loss::LossConfig;

use crate::learner::EmaConfig;

/// What the autoencoder learns to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Images, with the reference's VQGAN objective (L1 + LPIPS + PatchGAN + quantizer).
    #[default]
    Vqgan,
    /// One-hot segmentation maps (the samples' `.seg.png`), with the reference's
    /// `BCELossWithQuant`: binary cross-entropy on the logits plus the quantizer loss, no
    /// discriminator. This trains the cond stage of segmentation-conditioned transformers.
    Segmentation,
}

/// Everything a stage-1 run needs besides its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Config {
    /// What is learned: images (default) or segmentation maps.
    #[serde(default)]
    pub objective: Objective,
    /// The VQGAN.
    pub model: VqganConfig,
    /// The objective.
    #[serde(default)]
    pub loss: LossConfig,
    /// Learning rate per image: lr = base_learning_rate x batch x nodes x grad_accum.
    #[serde(default = "base_lr")]
    pub base_learning_rate: f64,
    /// Images per step per node (per micro-batch when accumulating).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Clip the averaged gradients of each network to this global l2 norm (as torch's
    /// `clip_grad_norm_`).
    #[serde(default)]
    pub grad_clip: Option<f32>,
    /// Horizontal flips in training augmentation.
    #[serde(default)]
    pub flip: bool,
    /// Seed of initialization, data order and augmentation.
    #[serde(default)]
    pub seed: u64,
    /// Validation images evaluated at each evaluation step (the first ones of the split);
    /// absent: the whole validation split. The metric columns name the count when set
    /// (`val256_l1`).
    #[serde(default)]
    pub val_images: Option<usize>,
    /// What a run does when losses stop being finite.
    #[serde(default)]
    pub divergence: Divergence,
    /// An exponential moving average of the autoencoder's weights, which validation, the
    /// pictures and the exported model use (absent: the weights themselves).
    #[serde(default)]
    pub ema: Option<EmaConfig>,
    /// What validation measures besides L1, PSNR, SSIM and usage.
    #[serde(default)]
    pub eval: EvalConfig,
}

/// Optional validation metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`, SHA-256
    /// checked): rFID of the validation images against their reconstructions (column
    /// `val_rfid`).
    pub inception: Option<PathBuf>,
    /// Accept `inception` weights other than pytorch-fid's file, in its layout.
    pub any_weights: bool,
    /// rFID at the evaluations whose step is a multiple of this (absent: at every
    /// evaluation); the others leave `val_rfid` empty (`NaN` in metrics.csv).
    pub fid_every: Option<u64>,
}

impl EvalConfig {
    /// Whether the evaluation at `step` measures rFID.
    pub fn fid_at(&self, step: u64) -> bool {
        self.inception.is_some() && self.fid_every.is_none_or(|n| step.is_multiple_of(n))
    }
}

/// Divergence handling: a step whose loss is not finite (on any rank) is skipped and
/// counted; `max_skips` skipped steps within `window` steps roll the run back to its latest
/// checkpoint with the learning rate multiplied by `lr_factor`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Divergence {
    /// Skipped steps that trigger a rollback.
    pub max_skips: usize,
    /// Steps the skips are counted over.
    pub window: u64,
    /// Factor on the learning rate at each rollback.
    pub lr_factor: f64,
}

impl Default for Divergence {
    fn default() -> Self {
        Self {
            max_skips: 3,
            window: 100,
            lr_factor: 0.5,
        }
    }
}

fn base_lr() -> f64 {
    4.5e-6
}

fn one() -> usize {
    1
}

impl Stage1Config {
    /// The reference's learning-rate scaling for `nodes` nodes.
    pub fn learning_rate(&self, nodes: usize) -> f64 {
        self.base_learning_rate * (self.batch_size * nodes * self.grad_accum) as f64
    }

    /// Whether every sample must bring a label map: the segmentation objective learns them,
    /// a conditional discriminator is given them.
    pub fn needs_label_maps(&self) -> bool {
        self.objective == Objective::Segmentation || self.loss.disc_conditional
    }

    /// Refuses impossible settings before any work; errors name the key.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.model.validate()?;
        let bad = |key: &str, reason: &str| ModelError::Config {
            key: key.into(),
            reason: reason.into(),
        };
        let d = &self.divergence;
        if d.max_skips == 0 || d.window == 0 || !(d.lr_factor > 0.0 && d.lr_factor < 1.0) {
            return Err(bad(
                "divergence",
                "max_skips and window must be positive and lr_factor in (0, 1)",
            ));
        }
        if let Some(ema) = &self.ema {
            ema.validate()?;
        }
        if self.eval.fid_every == Some(0) {
            return Err(bad(
                "eval.fid_every",
                "must be positive (absent: at every evaluation)",
            ));
        }
        if self.val_images == Some(0) {
            return Err(bad(
                "val_images",
                "must be positive (absent: the whole split)",
            ));
        }
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be positive"));
        }
        if self.grad_accum == 0 {
            return Err(bad("grad_accum", "must be positive"));
        }
        if self.base_learning_rate.is_nan() || self.base_learning_rate <= 0.0 {
            return Err(bad("base_learning_rate", "must be positive"));
        }
        if self.loss.perceptual_weight > 0.0 && self.loss.lpips.is_none() {
            return Err(bad(
                "loss.lpips",
                "perceptual_weight > 0 needs LPIPS weights: set loss.lpips.vgg16 (torchvision's \
                 vgg16 .pth) and loss.lpips.heads (lpips' weights/v0.1/vgg.pth), or set \
                 loss.perceptual_weight to 0",
            ));
        }
        if self.objective == Objective::Segmentation {
            let dd = &self.model.ddconfig;
            if dd.in_channels < 2 || dd.out_ch != dd.in_channels {
                return Err(bad(
                    "model.ddconfig.in_channels",
                    "a segmentation objective needs in_channels = out_ch = the number of labels (>= 2)",
                ));
            }
        }
        if self.loss.disc_conditional {
            if self.objective != Objective::Vqgan {
                return Err(bad(
                    "loss.disc_conditional",
                    "only the vqgan objective has a discriminator",
                ));
            }
            if self.loss.discriminator.in_channels <= self.model.ddconfig.out_ch {
                return Err(bad(
                    "loss.discriminator.in_channels",
                    "with disc_conditional it is the image channels (model.ddconfig.out_ch) plus \
                     the condition's label count (the label maps' labels), so above out_ch",
                ));
            }
        } else if self.loss.discriminator.in_channels != self.model.ddconfig.out_ch
            && self.objective == Objective::Vqgan
        {
            return Err(bad(
                "loss.discriminator.in_channels",
                "must equal model.ddconfig.out_ch (the discriminator sees images) unless \
                 loss.disc_conditional is set",
            ));
        }
        if let Some(lpips) = &self.loss.lpips {
            taming_model::loss::lpips::check_files(lpips)?;
        }
        Ok(())
    }
}
