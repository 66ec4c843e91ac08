//! The reference's Decoder: conv_in, a middle Res-Attn-Res, then per level (from the lowest
//! resolution up) `num_res_blocks + 1` residual blocks with attention at the listed
//! resolutions and an upsampler except at level 0, then norm, swish and conv_out (no tanh).

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};
use taming_kernels::conv;
use taming_kernels::norm::group_norm;

use super::blocks::{AttnBlock, ResnetBlock, Upsample, conv3x3, norm};
use super::encoder::Mid;
use crate::config::DdConfig;

/// One resolution level of the decoder, stored at its level index as in the reference.
#[derive(Module, Debug)]
pub struct UpLevel {
    block: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    upsample: Option<Upsample>,
}

/// Latent map to image, upsampling by `2^(len(ch_mult)-1)`.
#[derive(Module, Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Builds a decoder for `dd` (which must be valid).
    pub fn new(dd: &DdConfig, device: &Device) -> Self {
        let levels = dd.ch_mult.len();
        let top = dd.ch * dd.ch_mult[levels - 1];
        let mut block_in = top;
        let mut up = Vec::with_capacity(levels);
        for level in (0..levels).rev() {
            let block_out = dd.ch * dd.ch_mult[level];
            let attends = dd.attn_resolutions.contains(&dd.level_resolution(level));
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for _ in 0..=dd.num_res_blocks {
                block.push(ResnetBlock::new(block_in, block_out, dd.dropout, device));
                block_in = block_out;
                if attends {
                    attn.push(AttnBlock::new(block_in, device));
                }
            }
            let upsample =
                (level != 0).then(|| Upsample::new(block_in, dd.resamp_with_conv, device));
            up.push(UpLevel {
                block,
                attn,
                upsample,
            });
        }
        up.reverse();
        Self {
            conv_in: conv3x3(dd.z_channels, top, device),
            mid: Mid::new(top, dd.dropout, device),
            up,
            norm_out: norm(block_in, device),
            conv_out: conv3x3(block_in, dd.out_ch, device),
        }
    }

    /// Decodes `[b, z_channels, h, w]` to images `[b, out_ch, h*f, w*f]`.
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        self.forward_with_last_input(z).0
    }

    /// Decodes and also returns the input of the last convolution (for the adaptive weight).
    pub fn forward_with_last_input(&self, z: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let mut h = self.mid.forward(conv::forward(&self.conv_in, z));
        for level in self.up.iter().rev() {
            for (i, block) in level.block.iter().enumerate() {
                h = block.forward(h);
                if let Some(attn) = level.attn.get(i) {
                    h = attn.forward(h);
                }
            }
            if let Some(up) = &level.upsample {
                h = up.forward(h);
            }
        }
        let last_input = group_norm(&self.norm_out, h, true);
        (
            conv::forward(&self.conv_out, last_input.clone()),
            last_input,
        )
    }

    /// The last convolution's weight, where the adaptive GAN weight takes its gradients.
    pub fn last_layer_weight(&self) -> Tensor<4> {
        self.conv_out.weight.val()
    }
}
