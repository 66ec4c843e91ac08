//! SimVQ (Zhu et al. 2024) as vector-quantize-pytorch 1.32's `SimVQ` computes it: a frozen
//! random codebook (`N(0, 1/d)`) through one learned linear layer (no bias) is the codebook;
//! latents take their nearest code, the loss is `|e - sg[z]|^2 + beta |sg[e] - z|^2`, and
//! gradients reach the encoder through the rotation trick (or straight through). Training
//! the linear layer moves the whole codebook at once, so no code is left behind.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Int, Tensor};

use super::vector::rotate_to;
use super::{Quantized, from_rows, squared_distances, to_rows};
use crate::config::{Estimator, SimVqConfig};

/// The SimVQ quantizer: codes are `code_transform(frozen_codebook)`.
#[derive(Module, Debug)]
pub struct SimVqQuantizer {
    /// The frozen random codebook, `[n_embed, embed_dim]`.
    pub frozen_codebook: Param<Tensor<2>>,
    /// The learned map from frozen to actual codes.
    pub code_transform: Linear,
    beta: f64,
    rotation: bool,
}

impl SimVqQuantizer {
    /// `n_embed` codes for `embed_dim`-channel latents.
    pub fn new(n_embed: usize, embed_dim: usize, cfg: &SimVqConfig, device: &Device) -> Self {
        let frozen =
            Tensor::<2>::random([n_embed, embed_dim], Distribution::Normal(0.0, 1.0), device)
                .mul_scalar((embed_dim as f64).powf(-0.5));
        Self {
            frozen_codebook: Param::from_tensor(frozen).set_require_grad(false),
            code_transform: LinearConfig::new(embed_dim, embed_dim)
                .with_bias(false)
                .init(device),
            beta: cfg.beta,
            rotation: cfg.estimator == Estimator::Rotation,
        }
    }

    /// Number of codes.
    pub fn n_embed(&self) -> usize {
        self.frozen_codebook.dims()[0]
    }

    /// The codebook in use, `[n_embed, embed_dim]`.
    pub fn codebook(&self) -> Tensor<2> {
        self.code_transform.forward(self.frozen_codebook.val())
    }

    /// Quantizes `[b, embed_dim, h, w]`.
    pub fn forward(&self, z: Tensor<4>) -> Quantized {
        let [b, _, h, w] = z.dims();
        let latents = to_rows(z);
        let codebook = self.codebook();
        let indices = squared_distances(latents.clone().detach(), codebook.clone().detach())
            .argmin(1)
            .reshape([b * h * w]);
        let chosen = codebook.select(0, indices.clone());
        let codebook_term = (chosen.clone() - latents.clone().detach())
            .powi_scalar(2)
            .mean();
        let commitment = (latents.clone() - chosen.clone().detach())
            .powi_scalar(2)
            .mean();
        let passed = if self.rotation {
            rotate_to(latents.clone(), chosen)
        } else {
            latents.clone() + (chosen - latents.clone()).detach()
        };
        Quantized {
            z_q: from_rows(passed, [b, h, w]),
            loss: codebook_term + commitment.mul_scalar(self.beta),
            indices: indices.reshape([b, h, w]),
            lookup_latents: latents.detach(),
        }
    }

    /// Code vectors for indices `[b, h, w]`, as `[b, embed_dim, h, w]`.
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let rows = self.codebook().select(0, indices.reshape([b * h * w]));
        from_rows(rows, [b, h, w])
    }
}
