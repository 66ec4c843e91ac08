//! Stage-2 training settings: the GPT's shape, token dropout and order, and the optimization
//! recipe (AdamW with betas (0.9, 0.95), weight decay on Linear weights only, the reference's
//! learning-rate scaling, optional warmup and cosine decay). The vocabulary, block size and
//! conditioning follow from the VQGAN and the data at run time.

use serde::{Deserialize, Serialize};
use taming_model::error::ModelError;
use taming_model::transformer::{Conditioning, GptConfig, PermuterKind, TransformerConfig};

use crate::learner::EmaConfig;

/// The GPT's shape without the sizes the data fixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptShape {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Model width.
    pub n_embd: usize,
    /// Dropout after the embeddings.
    #[serde(default)]
    pub embd_pdrop: f64,
    /// Dropout on residual branches.
    #[serde(default)]
    pub resid_pdrop: f64,
    /// Dropout on attention weights.
    #[serde(default)]
    pub attn_pdrop: f64,
}

/// Learning-rate schedule after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The scaled rate throughout (the reference).
    #[default]
    Constant,
    /// Cosine decay to `min_lr_ratio` of the rate at the last step.
    Cosine,
}

/// Everything a stage-2 run needs besides its data and first stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Config {
    /// The GPT.
    pub gpt: GptShape,
    /// Training window in tokens (default: the data's whole token grid).
    #[serde(default)]
    pub window: Option<[usize; 2]>,
    /// Probability of keeping an input image token (others become random codes).
    #[serde(default = "one")]
    pub pkeep: f64,
    /// Token order.
    #[serde(default)]
    pub permuter: PermuterKind,
    /// Classes of class-conditional runs (default: the largest label in the data + 1).
    #[serde(default)]
    pub n_classes: Option<usize>,
    /// Learning rate per sequence: lr = base_learning_rate x batch x nodes x grad_accum.
    #[serde(default = "base_lr")]
    pub base_learning_rate: f64,
    /// Sequences per step per node (per micro-batch when accumulating).
    pub batch_size: usize,
    /// Micro-batches summed before each optimizer step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// AdamW weight decay on Linear weights.
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// Steps of linear warmup.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Schedule after the warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// Final rate of the cosine schedule as a fraction of the peak.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Clip the averaged gradients to this global l2 norm (as torch's `clip_grad_norm_`).
    #[serde(default)]
    pub grad_clip: Option<f32>,
    /// Seed of initialization, data order and token dropout.
    #[serde(default)]
    pub seed: u64,
    /// An exponential moving average of the GPT's weights, which validation, sampling and
    /// the exported model use (absent: the weights themselves).
    #[serde(default)]
    pub ema: Option<EmaConfig>,
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn base_lr() -> f64 {
    4.5e-6
}
fn weight_decay() -> f64 {
    0.01
}

impl Stage2Config {
    /// The reference's learning-rate scaling for `nodes` nodes.
    pub fn peak_learning_rate(&self, nodes: usize) -> f64 {
        self.base_learning_rate * (self.batch_size * nodes * self.grad_accum) as f64
    }

    /// The rate at optimizer step `step` (0-based) of a run of `total` steps.
    pub fn learning_rate(&self, nodes: usize, step: u64, total: u64) -> f64 {
        let peak = self.peak_learning_rate(nodes);
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => peak,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = peak * self.min_lr_ratio;
                min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// Refuses impossible settings; errors name the key.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &str, reason: &str| ModelError::Config {
            key: key.into(),
            reason: reason.into(),
        };
        if let Some(ema) = &self.ema {
            ema.validate()?;
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
        if !(0.0..1.0).contains(&self.weight_decay) {
            return Err(bad("weight_decay", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(bad("min_lr_ratio", "must be in [0, 1]"));
        }
        let probe = self.model(16, [2, 2], Conditioning::None { sos_token: 0 });
        probe.gpt.validate("gpt.")?;
        if !(self.pkeep > 0.0 && self.pkeep <= 1.0) {
            return Err(bad("pkeep", "must be in (0, 1]"));
        }
        Ok(())
    }

    /// The transformer for `n_embed` image codes, a `window` and a conditioning.
    pub fn model(
        &self,
        n_embed: usize,
        window: [usize; 2],
        cond: Conditioning,
    ) -> TransformerConfig {
        let g = &self.gpt;
        let gpt = GptConfig {
            vocab_size: 0,
            block_size: 0,
            n_layer: g.n_layer,
            n_head: g.n_head,
            n_embd: g.n_embd,
            embd_pdrop: g.embd_pdrop,
            resid_pdrop: g.resid_pdrop,
            attn_pdrop: g.attn_pdrop,
        };
        let mut config = TransformerConfig::sized(gpt, n_embed, window, cond);
        config.pkeep = self.pkeep;
        config.permuter = self.permuter;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(schedule: Schedule) -> Stage2Config {
        serde_yaml::from_str::<Stage2Config>(
            "gpt: {n_layer: 1, n_head: 1, n_embd: 8}\nbatch_size: 4\nbase_learning_rate: 1.0e-3\nwarmup_steps: 10\nmin_lr_ratio: 0.1\n",
        )
        .map(|c| Stage2Config { schedule, ..c })
        .unwrap()
    }

    #[test]
    fn rate_scales_warms_up_then_follows_the_schedule() {
        let c = config(Schedule::Cosine);
        let peak = 1e-3 * 4.0 * 2.0;
        assert!((c.peak_learning_rate(2) - peak).abs() < 1e-12);
        assert!((c.learning_rate(2, 0, 110) - peak / 10.0).abs() < 1e-12);
        assert!((c.learning_rate(2, 9, 110) - peak).abs() < 1e-12);
        assert!((c.learning_rate(2, 10, 110) - peak).abs() < 1e-12);
        assert!((c.learning_rate(2, 60, 110) - peak * 0.55).abs() < 1e-9);
        assert!((c.learning_rate(2, 110, 110) - peak * 0.1).abs() < 1e-12);
        let flat = config(Schedule::Constant);
        assert!((flat.learning_rate(2, 100, 110) - peak).abs() < 1e-12);
    }
}
