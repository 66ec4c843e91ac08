//! Stage-2 configuration: the GPT's shape ([`GptConfig`], the reference's minGPT arguments)
//! and what the transformer models ([`TransformerConfig`]: image codebook, conditioning,
//! token dropout, permuter, training window).
//!
//! Token layout: image codes take embedding rows `0..n_embed`; cond tokens (the SOS token,
//! class labels or cond-stage codes) take `cond_offset..cond_offset + cond vocabulary`, by
//! default right after the image codes, so class 5 and image code 5 are different rows.
//! Imported reference models set `cond_offset: 0`, where they share rows.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The GPT's shape, named as the reference's `mingpt.GPT` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Rows of the token embedding and columns of the head.
    pub vocab_size: usize,
    /// Longest sequence (learned positions).
    pub block_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Model width.
    pub n_embd: usize,
    /// Dropout after the embeddings.
    #[serde(default)]
    pub embd_pdrop: f64,
    /// Dropout on each block's residual branches.
    #[serde(default)]
    pub resid_pdrop: f64,
    /// Dropout on the attention weights.
    #[serde(default)]
    pub attn_pdrop: f64,
}

impl GptConfig {
    /// The reference's FacesHQ / D-RIN transformer: 24 layers, 16 heads, 1024 wide.
    pub fn reference_large(vocab_size: usize, block_size: usize) -> Self {
        Self {
            vocab_size,
            block_size,
            n_layer: 24,
            n_head: 16,
            n_embd: 1024,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attn_pdrop: 0.0,
        }
    }

    /// Checks the shape; errors name the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ModelError> {
        let bad = |key: &str, reason: String| ModelError::Config {
            key: format!("{prefix}{key}"),
            reason,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(bad(
                "n_embd",
                format!("{} is not divisible by n_head {}", self.n_embd, self.n_head),
            ));
        }
        for (key, p) in [
            ("embd_pdrop", self.embd_pdrop),
            ("resid_pdrop", self.resid_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(key, format!("{p} is not in [0, 1)")));
            }
        }
        Ok(())
    }
}

/// What the image tokens are conditioned on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Conditioning {
    /// Nothing: one start-of-sequence token.
    None {
        /// The SOS token's value inside the cond range.
        #[serde(default)]
        sos_token: usize,
    },
    /// A class label: one token.
    Class {
        /// Number of classes.
        n_classes: usize,
    },
    /// A segmentation map encoded by a second VQGAN: its codes, one per image token.
    Segmentation {
        /// The cond-stage VQGAN's codebook size.
        n_embed: usize,
        /// Label classes of the maps (the cond VQGAN's input channels).
        classes: usize,
    },
}

impl Conditioning {
    /// Size of the cond token range.
    pub fn vocab(&self) -> usize {
        match self {
            Self::None { sos_token } => sos_token + 1,
            Self::Class { n_classes } => *n_classes,
            Self::Segmentation { n_embed, .. } => *n_embed,
        }
    }

    /// Short name: `none`, `class` or `segmentation`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None { .. } => "none",
            Self::Class { .. } => "class",
            Self::Segmentation { .. } => "segmentation",
        }
    }
}

/// Order in which a token grid is flattened into a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PermuterKind {
    /// Raster order.
    #[default]
    Identity,
    /// The reference's z-order (Morton) curve.
    ZCurve,
    /// The reference's `Subsample`: coarse-to-fine by repeated 2x2 subsampling.
    Subsample,
}

/// A stage-2 model: the GPT plus what its tokens mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// The GPT.
    pub gpt: GptConfig,
    /// Codebook size of the first-stage VQGAN (image tokens `0..n_embed`).
    pub n_embed: usize,
    /// The training window in tokens, `[height, width]` (e.g. 16x16 for 256 px at f16).
    pub window: [usize; 2],
    /// What the image is conditioned on.
    pub cond: Conditioning,
    /// First embedding row of cond tokens (default: `n_embed`, their own range).
    #[serde(default)]
    pub cond_offset: Option<usize>,
    /// Probability of keeping an image token during training (others become random codes).
    #[serde(default = "one")]
    pub pkeep: f64,
    /// Token order within the window.
    #[serde(default)]
    pub permuter: PermuterKind,
}

fn one() -> f64 {
    1.0
}

impl TransformerConfig {
    /// Image tokens per window.
    pub fn window_tokens(&self) -> usize {
        self.window[0] * self.window[1]
    }

    /// Cond tokens before the image tokens.
    pub fn cond_len(&self) -> usize {
        match self.cond {
            Conditioning::Segmentation { .. } => self.window_tokens(),
            _ => 1,
        }
    }

    /// First embedding row of cond tokens.
    pub fn cond_offset(&self) -> usize {
        self.cond_offset.unwrap_or(self.n_embed)
    }

    /// The smallest GPT vocabulary this layout needs.
    pub fn needed_vocab(&self) -> usize {
        self.n_embed.max(self.cond_offset() + self.cond.vocab())
    }

    /// A config whose GPT fits the layout exactly: `vocab_size` and `block_size` derived.
    pub fn sized(
        mut gpt: GptConfig,
        n_embed: usize,
        window: [usize; 2],
        cond: Conditioning,
    ) -> Self {
        let mut config = Self {
            gpt: gpt.clone(),
            n_embed,
            window,
            cond,
            cond_offset: None,
            pkeep: 1.0,
            permuter: PermuterKind::Identity,
        };
        gpt.vocab_size = config.needed_vocab();
        gpt.block_size = config.cond_len() + config.window_tokens() - 1;
        config.gpt = gpt;
        config
    }

    /// Checks the config; errors name the key.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.gpt.validate("gpt.")?;
        let bad = |key: &str, reason: String| ModelError::Config {
            key: key.into(),
            reason,
        };
        if self.n_embed == 0 {
            return Err(bad("n_embed", "must be positive".into()));
        }
        if self.window[0] == 0 || self.window[1] == 0 {
            return Err(bad("window", "must be at least 1x1".into()));
        }
        if self.cond.vocab() == 0 {
            return Err(bad("cond", "has an empty token range".into()));
        }
        if let Conditioning::Segmentation { classes: 0, .. } = self.cond {
            return Err(bad("cond.classes", "must be positive".into()));
        }
        if self.gpt.vocab_size < self.needed_vocab() {
            return Err(bad(
                "gpt.vocab_size",
                format!(
                    "{} is too small: image codes and cond tokens need {}",
                    self.gpt.vocab_size,
                    self.needed_vocab()
                ),
            ));
        }
        let seq = self.cond_len() + self.window_tokens() - 1;
        if self.gpt.block_size < seq {
            return Err(bad(
                "gpt.block_size",
                format!(
                    "{} is shorter than the {} cond tokens + {} image tokens - 1 = {seq}",
                    self.gpt.block_size,
                    self.cond_len(),
                    self.window_tokens()
                ),
            ));
        }
        if !(self.pkeep > 0.0 && self.pkeep <= 1.0) {
            return Err(bad("pkeep", format!("{} is not in (0, 1]", self.pkeep)));
        }
        if self.permuter != PermuterKind::Identity {
            crate::transformer::permuter::Permutation::new(self.permuter, self.window)
                .map_err(|reason| bad("permuter", reason))?;
        }
        Ok(())
    }
}
