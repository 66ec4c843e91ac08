//! Gumbel-softmax quantization as the reference's GumbelQuantize: a 1x1 convolution to code
//! logits, gumbel-softmax with a temperature (hard one-hot with straight-through gradients),
//! and a KL-to-uniform prior term.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Int, Tensor};
use taming_kernels::conv;

use super::{QuantizeMode, Quantized, from_rows, to_rows};
use crate::config::GumbelConfig;
use crate::vqgan::blocks::conv1x1;

/// Gumbel quantizer: `proj` maps `[b, embed_dim, h, w]` to logits over codes in `embed`.
#[derive(Module, Debug)]
pub struct GumbelQuantizer {
    /// 1x1 convolution from latents to code logits.
    pub proj: Conv2d,
    /// The codebook, `[n_embed, embed_dim]`.
    pub embed: Embedding,
    kl_weight: f64,
    straight_through: bool,
}

impl GumbelQuantizer {
    /// A Gumbel quantizer with `n_embed` codes of dimension `embed_dim`.
    pub fn new(n_embed: usize, embed_dim: usize, cfg: &GumbelConfig, device: &Device) -> Self {
        Self {
            proj: conv1x1(embed_dim, n_embed, device),
            embed: EmbeddingConfig::new(n_embed, embed_dim).init(device),
            kl_weight: cfg.kl_weight,
            straight_through: cfg.straight_through,
        }
    }

    /// Number of codes.
    pub fn n_embed(&self) -> usize {
        self.embed.weight.dims()[0]
    }

    /// Quantizes `[b, embed_dim, h, w]`. Training samples `softmax((logits + g) / tau)` with
    /// Gumbel noise `g` (hard one-hot plus straight-through when configured); evaluation takes
    /// the most likely code without noise, so that encoding is deterministic.
    pub fn forward(&self, z: Tensor<4>, mode: QuantizeMode) -> Quantized {
        let [b, _, h, w] = z.dims();
        let n = self.n_embed();
        let logits = to_rows(conv::forward(&self.proj, z));
        let loss = self.kl(logits.clone());
        let (weights, indices) = if mode.training {
            self.sample(logits.clone(), mode.temperature)
        } else {
            let indices = logits.clone().argmax(1).reshape([b * h * w]);
            (indices.clone().one_hot::<2>(n).float(), indices)
        };
        let z_q = from_rows(weights.matmul(self.embed.weight.val()), [b, h, w]);
        Quantized {
            z_q,
            loss,
            indices: indices.reshape([b, h, w]),
            lookup_latents: logits.detach(),
        }
    }

    fn sample(&self, logits: Tensor<2>, temperature: f64) -> (Tensor<2>, Tensor<1, Int>) {
        let [rows, n] = logits.dims();
        let uniform = Tensor::<2>::random(
            [rows, n],
            Distribution::Uniform(1e-10, 1.0),
            &logits.device(),
        );
        let gumbel = uniform.log().neg().log().neg();
        let soft = softmax((logits + gumbel).div_scalar(temperature), 1);
        let indices = soft.clone().argmax(1).reshape([rows]);
        if !self.straight_through {
            return (soft, indices);
        }
        let hard = indices.clone().one_hot::<2>(n).float();
        (hard - soft.clone().detach() + soft, indices)
    }

    /// `kl_weight * mean over positions of sum_k q_k log(q_k * n + 1e-10)`.
    fn kl(&self, logits: Tensor<2>) -> Tensor<1> {
        let n = self.n_embed() as f64;
        let q = softmax(logits.clone(), 1);
        let terms = q.clone() * q.mul_scalar(n).add_scalar(1e-10).log();
        terms.sum_dim(1).mean().mul_scalar(self.kl_weight)
    }

    /// Code vectors for indices `[b, h, w]`, as `[b, embed_dim, h, w]`.
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let rows = self
            .embed
            .weight
            .val()
            .select(0, indices.reshape([b * h * w]));
        from_rows(rows, [b, h, w])
    }
}
