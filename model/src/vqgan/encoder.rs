//! The reference's Encoder: conv_in, per level `num_res_blocks` residual blocks (with attention
//! at the listed resolutions) and a downsampler except at the last level, a middle
//! Res-Attn-Res, then norm, swish and conv_out.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};
use taming_kernels::conv;
use taming_kernels::norm::group_norm;

use super::blocks::{AttnBlock, Downsample, ResnetBlock, conv3x3, norm};
use crate::config::DdConfig;

/// One resolution level of the encoder.
#[derive(Module, Debug)]
pub struct DownLevel {
    block: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    downsample: Option<Downsample>,
}

/// The middle of both encoder and decoder: residual, attention, residual.
#[derive(Module, Debug)]
pub struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    /// A middle section over `channels` channels.
    pub fn new(channels: usize, dropout: f64, device: &Device) -> Self {
        Self {
            block_1: ResnetBlock::new(channels, channels, dropout, device),
            attn_1: AttnBlock::new(channels, device),
            block_2: ResnetBlock::new(channels, channels, dropout, device),
        }
    }

    /// Applies the section.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.block_2
            .forward(self.attn_1.forward(self.block_1.forward(x)))
    }
}

/// Image to latent map, downsampling by `2^(len(ch_mult)-1)`.
#[derive(Module, Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownLevel>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Builds an encoder for `dd` (which must be valid).
    pub fn new(dd: &DdConfig, device: &Device) -> Self {
        let levels = dd.ch_mult.len();
        let mut down = Vec::with_capacity(levels);
        let mut block_in = dd.ch;
        for (level, mult) in dd.ch_mult.iter().enumerate() {
            let block_out = dd.ch * mult;
            let attends = dd.attn_resolutions.contains(&dd.level_resolution(level));
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for _ in 0..dd.num_res_blocks {
                block.push(ResnetBlock::new(block_in, block_out, dd.dropout, device));
                block_in = block_out;
                if attends {
                    attn.push(AttnBlock::new(block_in, device));
                }
            }
            let downsample = (level + 1 != levels)
                .then(|| Downsample::new(block_in, dd.resamp_with_conv, device));
            down.push(DownLevel {
                block,
                attn,
                downsample,
            });
        }
        Self {
            conv_in: conv3x3(dd.in_channels, dd.ch, device),
            down,
            mid: Mid::new(block_in, dd.dropout, device),
            norm_out: norm(block_in, device),
            conv_out: conv3x3(block_in, dd.encoder_out_channels(), device),
        }
    }

    /// Encodes images `[b, in_channels, h, w]` to `[b, z, h/f, w/f]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = conv::forward(&self.conv_in, x);
        for level in &self.down {
            for (i, block) in level.block.iter().enumerate() {
                h = block.forward(h);
                if let Some(attn) = level.attn.get(i) {
                    h = attn.forward(h);
                }
            }
            if let Some(down) = &level.downsample {
                h = down.forward(h);
            }
        }
        let h = self.mid.forward(h);
        conv::forward(&self.conv_out, group_norm(&self.norm_out, h, true))
    }
}
