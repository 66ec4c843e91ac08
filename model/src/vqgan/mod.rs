//! The first-stage model: Encoder, `quant_conv`, quantizer, `post_quant_conv`, Decoder.

pub mod blocks;
pub mod decoder;
pub mod encoder;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Int, Tensor};
use taming_kernels::conv;

use crate::config::{QuantizerConfig, VqganConfig};
use crate::error::ModelError;
use crate::quantize::{
    FsqQuantizer, GumbelQuantizer, LfqQuantizer, QuantizeMode, Quantized, Quantizer,
    SimVqQuantizer, VectorQuantizer,
};
pub use decoder::Decoder;
pub use encoder::Encoder;

/// A VQGAN. Parameter paths match the reference's state dict (`encoder.down.0.block.0.conv1`,
/// `quantize.embedding`, ...), except GroupNorm's `gamma`/`beta` for `weight`/`bias`.
#[derive(Module, Debug)]
pub struct Vqgan {
    /// Image to latents.
    pub encoder: Encoder,
    /// Latents to image.
    pub decoder: Decoder,
    /// 1x1 convolution from `z_channels` to `embed_dim`.
    pub quant_conv: Conv2d,
    /// 1x1 convolution from `embed_dim` to `z_channels`.
    pub post_quant_conv: Conv2d,
    /// The quantizer.
    pub quantize: Quantizer,
}

/// Everything a forward pass computes.
#[derive(Debug, Clone)]
pub struct VqganOutput {
    /// Reconstructed images `[b, out_ch, h, w]`.
    pub reconstruction: Tensor<4>,
    /// The quantizer's outputs.
    pub quantized: Quantized,
    /// Input of the decoder's last convolution (for the adaptive GAN weight).
    pub last_input: Tensor<4>,
}

impl Vqgan {
    /// Builds a randomly initialized model after validating `config`.
    pub fn new(config: &VqganConfig, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let dd = &config.ddconfig;
        let quantize = match &config.quantizer {
            QuantizerConfig::Vector(vq) => Quantizer::Vector(VectorQuantizer::new(
                config.n_embed,
                config.embed_dim,
                vq,
                device,
            )),
            QuantizerConfig::Fsq(f) => Quantizer::Fsq(FsqQuantizer::new(f)),
            QuantizerConfig::Lfq(c) => Quantizer::Lfq(LfqQuantizer::new(config.embed_dim, c)),
            QuantizerConfig::Simvq(c) => Quantizer::SimVq(SimVqQuantizer::new(
                config.n_embed,
                config.embed_dim,
                c,
                device,
            )),
            QuantizerConfig::Gumbel(g) => Quantizer::Gumbel(GumbelQuantizer::new(
                config.n_embed,
                config.embed_dim,
                g,
                device,
            )),
        };
        Ok(Self {
            encoder: Encoder::new(dd, device),
            decoder: Decoder::new(dd, device),
            quant_conv: blocks::conv1x1(dd.z_channels, config.embed_dim, device),
            post_quant_conv: blocks::conv1x1(config.embed_dim, dd.z_channels, device),
            quantize,
        })
    }

    /// Encoder output and pre-quantization latents (after `quant_conv`).
    pub fn encode_pre_quant(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let h = self.encoder.forward(x);
        let pre = conv::forward(&self.quant_conv, h.clone());
        (h, pre)
    }

    /// Encodes images `[b, c, h, w]` in [-1, 1] to quantized latents and code indices.
    pub fn encode(&self, x: Tensor<4>, mode: QuantizeMode) -> Quantized {
        let (_, pre) = self.encode_pre_quant(x);
        self.quantize.forward(pre, mode)
    }

    /// Decodes quantized latents `[b, embed_dim, h, w]` to images.
    pub fn decode(&self, z_q: Tensor<4>) -> Tensor<4> {
        self.decoder
            .forward(conv::forward(&self.post_quant_conv, z_q))
    }

    /// Decodes code indices `[b, h, w]` to images.
    pub fn decode_indices(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        self.decode(self.quantize.lookup(indices))
    }

    /// Encode, quantize and decode.
    pub fn forward(&self, x: Tensor<4>, mode: QuantizeMode) -> VqganOutput {
        let quantized = self.encode(x, mode);
        let h = conv::forward(&self.post_quant_conv, quantized.z_q.clone());
        let (reconstruction, last_input) = self.decoder.forward_with_last_input(h);
        VqganOutput {
            reconstruction,
            quantized,
            last_input,
        }
    }

    /// The decoder's last convolution weight (for the adaptive GAN weight).
    pub fn last_layer_weight(&self) -> Tensor<4> {
        self.decoder.last_layer_weight()
    }
}
