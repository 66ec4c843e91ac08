//! The Inception-v3 of FID, exactly as pytorch-fid 0.3.0 runs it (`InceptionV3([3])` with
//! `use_fid_inception=True`): torchvision's Inception-v3 trunk with the blocks patched as the
//! TensorFlow graph of the original FID computes them (`FIDInceptionA`, `FIDInceptionC` and
//! `FIDInceptionE_1` average-pool without counting the padding, `FIDInceptionE_2` max-pools),
//! its input resized to 299x299 (bilinear, `align_corners=False`, no antialiasing, as
//! `F.interpolate` does) and mapped from [0, 1] to [-1, 1] (`2x - 1`), and the 2048-d features
//! of the final average pool.
//!
//! Parameters are named as in pytorch-fid's weights file (`Mixed_5b.branch1x1.conv.weight`,
//! `Conv2d_1a_3x3.bn.running_var`) through [`torch_name`]; `taming-import` reads that file.
//! Batch normalization is in inference mode (running statistics, eps 0.001).

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::module::{avg_pool2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

use taming_kernels::conv;

/// Side of the square input the network sees.
pub const INPUT_SIZE: usize = 299;
/// Length of a feature vector (the final average pool).
pub const FEATURES: usize = 2048;
/// Batch normalization's epsilon in torchvision's `BasicConv2d`.
const BN_EPS: f64 = 1e-3;

/// Batch normalization with frozen statistics, named as PyTorch's `BatchNorm2d`.
#[derive(Module, Debug)]
pub struct FrozenBatchNorm {
    weight: Param<Tensor<1>>,
    bias: Param<Tensor<1>>,
    running_mean: Param<Tensor<1>>,
    running_var: Param<Tensor<1>>,
}

impl FrozenBatchNorm {
    fn new(channels: usize, device: &Device) -> Self {
        let p = |v: Tensor<1>| Param::from_tensor(v).set_require_grad(false);
        Self {
            weight: p(Tensor::ones([channels], device)),
            bias: p(Tensor::zeros([channels], device)),
            running_mean: p(Tensor::zeros([channels], device)),
            running_var: p(Tensor::ones([channels], device)),
        }
    }

    /// `x * a + (bias - mean * a)` with `a = weight / sqrt(var + eps)`, as PyTorch's CPU
    /// inference kernel computes it.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.weight.dims()[0];
        let alpha = self.running_var.val().add_scalar(BN_EPS).sqrt().recip() * self.weight.val();
        let shift = self.bias.val() - self.running_mean.val() * alpha.clone();
        x * alpha.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
    }
}

/// torchvision's `BasicConv2d`: convolution without bias, batch norm, ReLU.
#[derive(Module, Debug)]
pub struct BasicConv2d {
    conv: Conv2d,
    bn: FrozenBatchNorm,
}

impl BasicConv2d {
    fn new(
        channels: [usize; 2],
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
        device: &Device,
    ) -> Self {
        let [ph, pw] = padding;
        Self {
            conv: Conv2dConfig::new(channels, kernel)
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
                .with_bias(false)
                .init(device),
            bn: FrozenBatchNorm::new(channels[1], device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(self.bn.forward(conv::forward(&self.conv, x)))
    }
}

/// A square `k x k` convolution block with `stride` and padding `pad`.
fn square(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, d: &Device) -> BasicConv2d {
    BasicConv2d::new([cin, cout], [k, k], stride, [pad, pad], d)
}

/// A `1 x k` (`wide`) or `k x 1` convolution block with "same" padding.
fn line(cin: usize, cout: usize, k: usize, wide: bool, d: &Device) -> BasicConv2d {
    if wide {
        BasicConv2d::new([cin, cout], [1, k], 1, [0, k / 2], d)
    } else {
        BasicConv2d::new([cin, cout], [k, 1], 1, [k / 2, 0], d)
    }
}

/// 3x3 average pool, stride 1, padding 1, not counting the padding (the FID blocks).
fn avg_pool_3x3(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(
        x,
        AvgPoolOptions::new([3, 3])
            .with_stride([1, 1])
            .with_padding([1, 1])
            .with_count_include_pad(false),
    )
}

/// 3x3 max pool with stride 2 and no padding.
fn max_pool_3x3_s2(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]))
}

/// `FIDInceptionA` (Mixed_5b, 5c, 5d).
#[derive(Module, Debug)]
pub struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(cin: usize, pool_features: usize, d: &Device) -> Self {
        Self {
            branch1x1: square(cin, 64, 1, 1, 0, d),
            branch5x5_1: square(cin, 48, 1, 1, 0, d),
            branch5x5_2: square(48, 64, 5, 1, 2, d),
            branch3x3dbl_1: square(cin, 64, 1, 1, 0, d),
            branch3x3dbl_2: square(64, 96, 3, 1, 1, d),
            branch3x3dbl_3: square(96, 96, 3, 1, 1, d),
            branch_pool: square(cin, pool_features, 1, 1, 0, d),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self
            .branch5x5_2
            .forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_1.forward(x.clone());
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(b3));
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

/// torchvision's `InceptionB` (Mixed_6a).
#[derive(Module, Debug)]
pub struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn new(cin: usize, d: &Device) -> Self {
        Self {
            branch3x3: square(cin, 384, 3, 2, 0, d),
            branch3x3dbl_1: square(cin, 64, 1, 1, 0, d),
            branch3x3dbl_2: square(64, 96, 3, 1, 1, d),
            branch3x3dbl_3: square(96, 96, 3, 2, 0, d),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_1.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(bd));
        Tensor::cat(vec![b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionC` (Mixed_6b to 6e).
#[derive(Module, Debug)]
pub struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7_1: BasicConv2d,
    branch7x7_2: BasicConv2d,
    branch7x7_3: BasicConv2d,
    branch7x7dbl_1: BasicConv2d,
    branch7x7dbl_2: BasicConv2d,
    branch7x7dbl_3: BasicConv2d,
    branch7x7dbl_4: BasicConv2d,
    branch7x7dbl_5: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(cin: usize, c7: usize, d: &Device) -> Self {
        Self {
            branch1x1: square(cin, 192, 1, 1, 0, d),
            branch7x7_1: square(cin, c7, 1, 1, 0, d),
            branch7x7_2: line(c7, c7, 7, true, d),
            branch7x7_3: line(c7, 192, 7, false, d),
            branch7x7dbl_1: square(cin, c7, 1, 1, 0, d),
            branch7x7dbl_2: line(c7, c7, 7, false, d),
            branch7x7dbl_3: line(c7, c7, 7, true, d),
            branch7x7dbl_4: line(c7, c7, 7, false, d),
            branch7x7dbl_5: line(c7, 192, 7, true, d),
            branch_pool: square(cin, 192, 1, 1, 0, d),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = self.branch7x7_1.forward(x.clone());
        let b7 = self.branch7x7_3.forward(self.branch7x7_2.forward(b7));
        let bd = self.branch7x7dbl_1.forward(x.clone());
        let bd = self.branch7x7dbl_3.forward(self.branch7x7dbl_2.forward(bd));
        let bd = self.branch7x7dbl_5.forward(self.branch7x7dbl_4.forward(bd));
        let bp = self.branch_pool.forward(avg_pool_3x3(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

/// torchvision's `InceptionD` (Mixed_7a).
#[derive(Module, Debug)]
pub struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3_1: BasicConv2d,
    branch7x7x3_2: BasicConv2d,
    branch7x7x3_3: BasicConv2d,
    branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn new(cin: usize, d: &Device) -> Self {
        Self {
            branch3x3_1: square(cin, 192, 1, 1, 0, d),
            branch3x3_2: square(192, 320, 3, 2, 0, d),
            branch7x7x3_1: square(cin, 192, 1, 1, 0, d),
            branch7x7x3_2: line(192, 192, 7, true, d),
            branch7x7x3_3: line(192, 192, 7, false, d),
            branch7x7x3_4: square(192, 192, 3, 2, 0, d),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self
            .branch3x3_2
            .forward(self.branch3x3_1.forward(x.clone()));
        let b7 = self.branch7x7x3_1.forward(x.clone());
        let b7 = self.branch7x7x3_3.forward(self.branch7x7x3_2.forward(b7));
        let b7 = self.branch7x7x3_4.forward(b7);
        Tensor::cat(vec![b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionE_1` (Mixed_7b: average pool) and `FIDInceptionE_2` (Mixed_7c: max pool).
#[derive(Module, Debug)]
pub struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    max_pool: bool,
}

impl InceptionE {
    fn new(cin: usize, max_pool: bool, d: &Device) -> Self {
        Self {
            branch1x1: square(cin, 320, 1, 1, 0, d),
            branch3x3_1: square(cin, 384, 1, 1, 0, d),
            branch3x3_2a: line(384, 384, 3, true, d),
            branch3x3_2b: line(384, 384, 3, false, d),
            branch3x3dbl_1: square(cin, 448, 1, 1, 0, d),
            branch3x3dbl_2: square(448, 384, 3, 1, 1, d),
            branch3x3dbl_3a: line(384, 384, 3, true, d),
            branch3x3dbl_3b: line(384, 384, 3, false, d),
            branch_pool: square(cin, 192, 1, 1, 0, d),
            max_pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(
            vec![
                self.branch3x3_2a.forward(b3.clone()),
                self.branch3x3_2b.forward(b3),
            ],
            1,
        );
        let bd = self.branch3x3dbl_1.forward(x.clone());
        let bd = self.branch3x3dbl_2.forward(bd);
        let bd = Tensor::cat(
            vec![
                self.branch3x3dbl_3a.forward(bd.clone()),
                self.branch3x3dbl_3b.forward(bd),
            ],
            1,
        );
        let pooled = if self.max_pool {
            max_pool2d(
                x,
                MaxPoolOptions::new([3, 3])
                    .with_stride([1, 1])
                    .with_padding([1, 1]),
            )
        } else {
            avg_pool_3x3(x)
        };
        let bp = self.branch_pool.forward(pooled);
        Tensor::cat(vec![b1, b3, bd, bp], 1)
    }
}

/// pytorch-fid's FID Inception-v3 up to the 2048-d pool features.
#[derive(Module, Debug)]
pub struct FidInception {
    conv2d_1a_3x3: BasicConv2d,
    conv2d_2a_3x3: BasicConv2d,
    conv2d_2b_3x3: BasicConv2d,
    conv2d_3b_1x1: BasicConv2d,
    conv2d_4a_3x3: BasicConv2d,
    mixed_5b: InceptionA,
    mixed_5c: InceptionA,
    mixed_5d: InceptionA,
    mixed_6a: InceptionB,
    mixed_6b: InceptionC,
    mixed_6c: InceptionC,
    mixed_6d: InceptionC,
    mixed_6e: InceptionC,
    mixed_7a: InceptionD,
    mixed_7b: InceptionE,
    mixed_7c: InceptionE,
}

impl FidInception {
    /// The network with default-initialized weights (fill it from a weights file).
    pub fn new(device: &Device) -> Self {
        let d = device;
        Self {
            conv2d_1a_3x3: square(3, 32, 3, 2, 0, d),
            conv2d_2a_3x3: square(32, 32, 3, 1, 0, d),
            conv2d_2b_3x3: square(32, 64, 3, 1, 1, d),
            conv2d_3b_1x1: square(64, 80, 1, 1, 0, d),
            conv2d_4a_3x3: square(80, 192, 3, 1, 0, d),
            mixed_5b: InceptionA::new(192, 32, d),
            mixed_5c: InceptionA::new(256, 64, d),
            mixed_5d: InceptionA::new(288, 64, d),
            mixed_6a: InceptionB::new(288, d),
            mixed_6b: InceptionC::new(768, 128, d),
            mixed_6c: InceptionC::new(768, 160, d),
            mixed_6d: InceptionC::new(768, 160, d),
            mixed_6e: InceptionC::new(768, 192, d),
            mixed_7a: InceptionD::new(768, d),
            mixed_7b: InceptionE::new(1280, false, d),
            mixed_7c: InceptionE::new(2048, true, d),
        }
    }

    /// Pool features `[b, 2048]` of images `[b, 3, h, w]` with values in [0, 1]: resized to
    /// 299x299 and mapped to [-1, 1] first, as pytorch-fid does.
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        self.features_299(prepare(images))
    }

    /// Pool features `[b, 2048]` of inputs already resized to 299x299 and in [-1, 1] (see
    /// [`prepare`]).
    pub fn features_299(&self, x: Tensor<4>) -> Tensor<2> {
        // block 0
        let x = self.conv2d_1a_3x3.forward(x);
        let x = self.conv2d_2a_3x3.forward(x);
        let x = self.conv2d_2b_3x3.forward(x);
        let x = max_pool_3x3_s2(x);
        // block 1
        let x = self.conv2d_3b_1x1.forward(x);
        let x = self.conv2d_4a_3x3.forward(x);
        let x = max_pool_3x3_s2(x);
        // block 2
        let x = self.mixed_5b.forward(x);
        let x = self.mixed_5c.forward(x);
        let x = self.mixed_5d.forward(x);
        let x = self.mixed_6a.forward(x);
        let x = self.mixed_6b.forward(x);
        let x = self.mixed_6c.forward(x);
        let x = self.mixed_6d.forward(x);
        let x = self.mixed_6e.forward(x);
        // block 3
        let x = self.mixed_7a.forward(x);
        let x = self.mixed_7b.forward(x);
        let x = self.mixed_7c.forward(x);
        let [b, c, h, w] = x.dims();
        x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
    }
}

/// Images in [-1, 1] as the 8-bit values a PNG of them holds (clamped, rounded, as
/// `image_io::to_image` writes them), mapped to [0, 1]: what the Inception sees of a saved
/// reconstruction (rFID in `vqgan eval` and in training).
pub fn eight_bit(x: Tensor<4>) -> Tensor<4> {
    x.clamp(-1.0, 1.0)
        .add_scalar(1.0)
        .mul_scalar(127.5)
        .round()
        .clamp(0.0, 255.0)
        .div_scalar(255.0)
}

/// pytorch-fid's input transform: images `[b, 3, h, w]` in [0, 1] resized to 299x299
/// ([`resize_bilinear`]) and mapped to [-1, 1] by `2x - 1`.
pub fn prepare(images: Tensor<4>) -> Tensor<4> {
    resize_bilinear(images, [INPUT_SIZE, INPUT_SIZE])
        .mul_scalar(2.0)
        .sub_scalar(1.0)
}

/// `F.interpolate(x, size, mode='bilinear', align_corners=False)` without antialiasing: each
/// output pixel blends the two nearest input pixels along each axis (source coordinate
/// `(o + 0.5) * in / out - 0.5`, clamped at 0), computed as two matrix products.
pub fn resize_bilinear(x: Tensor<4>, [oh, ow]: [usize; 2]) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let device = x.device();
    // [w, ow] and [h, oh]: column o holds the weights of output o.
    let along_w = Tensor::<2>::from_data(
        TensorData::new(interpolation_matrix(w, ow), [w, ow]),
        &device,
    );
    let along_h = Tensor::<2>::from_data(
        TensorData::new(interpolation_matrix(h, oh), [h, oh]),
        &device,
    );
    let x = x.reshape([b * c * h, w]).matmul(along_w); // [b c h, ow]
    let x = x
        .reshape([b * c, h, ow])
        .swap_dims(1, 2)
        .reshape([b * c * ow, h]);
    let x = x.matmul(along_h); // [b c ow, oh]
    x.reshape([b, c, ow, oh]).swap_dims(2, 3)
}

/// `[input, output]` row-major weights of PyTorch's bilinear resampling along one axis
/// (`area_pixel_compute_source_index` and `compute_indices_weights_linear` in f32).
fn interpolation_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; input * output];
    let scale = input as f32 / output as f32;
    for o in 0..output {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        let lambda = (src - i0 as f32).clamp(0.0, 1.0);
        let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
        m[i0 * output + o] += 1.0 - lambda;
        m[i1 * output + o] += lambda;
    }
    m
}

/// pytorch-fid's name for one of our parameter paths (`mixed_5b.branch1x1.conv.weight` ->
/// `Mixed_5b.branch1x1.conv.weight`, `conv2d_1a_3x3.bn.weight` -> `Conv2d_1a_3x3.bn.weight`).
pub fn torch_name(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("conv2d_") {
        format!("Conv2d_{rest}")
    } else if let Some(rest) = path.strip_prefix("mixed_") {
        format!("Mixed_{rest}")
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_weights_follow_pytorch() {
        // Same size: the identity.
        let m = interpolation_matrix(3, 3);
        assert_eq!(m, vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]);
        // 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (i1 clamped to the edge).
        let m = interpolation_matrix(2, 4);
        let col = |o: usize| [m[o], m[4 + o]];
        assert_eq!(col(0), [1.0, 0.0]);
        assert_eq!(col(1), [0.75, 0.25]);
        assert_eq!(col(2), [0.25, 0.75]);
        assert_eq!(col(3), [0.0, 1.0]);
        // Every output's weights sum to one.
        let m = interpolation_matrix(64, 299);
        for o in 0..299 {
            let s: f32 = (0..64).map(|i| m[i * 299 + o]).sum();
            assert!((s - 1.0).abs() < 1e-6, "{o}: {s}");
        }
    }

    #[test]
    fn resize_of_a_ramp_is_linear_inside() {
        let device = Device::flex();
        // A horizontal ramp 0..8 over 8 columns, resized to 16 columns and 3 rows.
        let ramp: Vec<f32> = (0..2 * 8).map(|i| (i % 8) as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(ramp, [1, 1, 2, 8]), &device);
        let y = resize_bilinear(x, [3, 16]);
        assert_eq!(y.dims(), [1, 1, 3, 16]);
        let v = y.try_into_vec_as::<f32>().unwrap();
        for row in v.chunks(16) {
            // Output o reads source (o + 0.5) / 2 - 0.5, clamped to [0, 7].
            for (o, got) in row.iter().enumerate() {
                let want = ((o as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, 7.0);
                assert!((got - want).abs() < 1e-6, "{o}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn names_follow_pytorch_fid() {
        assert_eq!(
            torch_name("mixed_7c.branch3x3dbl_3b.bn.running_var"),
            "Mixed_7c.branch3x3dbl_3b.bn.running_var"
        );
        assert_eq!(
            torch_name("conv2d_1a_3x3.conv.weight"),
            "Conv2d_1a_3x3.conv.weight"
        );
    }
}
