//! The autoencoder's building blocks, named as in the reference so that checkpoint keys map
//! one to one (`norm1`, `conv1`, `nin_shortcut`, `q`, `k`, `v`, `proj_out`, ...).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::activation::softmax;
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};
use taming_kernels::conv;
use taming_kernels::norm::group_norm;

use crate::config::NORM_GROUPS;

/// GroupNorm with the reference's 32 groups and eps 1e-6.
pub fn norm(channels: usize, device: &Device) -> GroupNorm {
    GroupNormConfig::new(NORM_GROUPS, channels)
        .with_epsilon(1e-6)
        .init(device)
}

/// A 3x3 convolution with padding 1 and stride 1.
pub fn conv3x3(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// A 1x1 convolution.
pub fn conv1x1(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [1, 1]).init(device)
}

/// Residual block: norm, swish, conv3x3, norm, swish, dropout, conv3x3, plus a 1x1 shortcut
/// when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    dropout: Dropout,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// A block from `cin` to `cout` channels.
    pub fn new(cin: usize, cout: usize, dropout: f64, device: &Device) -> Self {
        Self {
            norm1: norm(cin, device),
            conv1: conv3x3(cin, cout, device),
            norm2: norm(cout, device),
            dropout: DropoutConfig::new(dropout).init(),
            conv2: conv3x3(cout, cout, device),
            nin_shortcut: (cin != cout).then(|| conv1x1(cin, cout, device)),
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = conv::forward(&self.conv1, group_norm(&self.norm1, x.clone(), true));
        let h = group_norm(&self.norm2, h, true);
        let h = conv::forward(&self.conv2, self.dropout.forward(h));
        let skip = match &self.nin_shortcut {
            Some(c) => conv::forward(c, x),
            None => x,
        };
        skip + h
    }
}

/// Single-head spatial self-attention with a residual connection.
#[derive(Module, Debug)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    /// An attention block over `channels` channels.
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            norm: norm(channels, device),
            q: conv1x1(channels, channels, device),
            k: conv1x1(channels, channels, device),
            v: conv1x1(channels, channels, device),
            proj_out: conv1x1(channels, channels, device),
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let hn = group_norm(&self.norm, x.clone(), false);
        let q = conv::forward(&self.q, hn.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let k = conv::forward(&self.k, hn.clone()).reshape([b, c, h * w]);
        let v = conv::forward(&self.v, hn).reshape([b, c, h * w]);
        // weights[b, i, j] = <q_i, k_j> / sqrt(c), softmax over j.
        let weights = softmax(q.matmul(k).mul_scalar((c as f64).powf(-0.5)), 2);
        let out = v.matmul(weights.swap_dims(1, 2)).reshape([b, c, h, w]);
        x + conv::forward(&self.proj_out, out)
    }
}

/// Halves the resolution: zero pad right and bottom by 1, then a 3x3 stride-2 convolution
/// (or 2x2 average pooling when `resamp_with_conv` is off).
#[derive(Module, Debug)]
pub struct Downsample {
    conv: Option<Conv2d>,
}

impl Downsample {
    /// A downsampler over `channels` channels.
    pub fn new(channels: usize, with_conv: bool, device: &Device) -> Self {
        let conv = with_conv.then(|| {
            Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
                .init(device)
        });
        Self { conv }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.conv {
            Some(c) => conv::forward(c, x),
            None => avg_pool2d(x, AvgPoolOptions::new([2, 2])),
        }
    }
}

/// Doubles the resolution: nearest-neighbour x2, then a 3x3 convolution (if enabled).
#[derive(Module, Debug)]
pub struct Upsample {
    conv: Option<Conv2d>,
}

impl Upsample {
    /// An upsampler over `channels` channels.
    pub fn new(channels: usize, with_conv: bool, device: &Device) -> Self {
        Self {
            conv: with_conv.then(|| conv3x3(channels, channels, device)),
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let options =
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]);
        let up = interpolate(x, options);
        match &self.conv {
            Some(c) => conv::forward(c, up),
            None => up,
        }
    }
}
