//! Finite scalar quantization (Mentzer et al. 2023) as vector-quantize-pytorch 1.32's `FSQ`
//! computes it: each latent channel `i` is bounded by `tanh` to its `levels[i]` values and
//! rounded with straight-through gradients, giving codes in [-1, 1]; a code's index is the
//! mixed-radix number of its per-channel levels (first channel least significant). There is
//! no codebook to learn and no codebook loss; every one of the `prod(levels)` codes exists
//! implicitly.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{Quantized, from_rows, to_rows};
use crate::config::FsqConfig;

/// The `eps` of the reference's `bound`, which keeps `tanh` off the outermost level.
const EPS: f64 = 1e-3;

/// The FSQ quantizer for `levels.len()`-channel latents.
#[derive(Module, Debug)]
pub struct FsqQuantizer {
    levels: Vec<usize>,
}

impl FsqQuantizer {
    /// A quantizer with these levels per channel.
    pub fn new(cfg: &FsqConfig) -> Self {
        Self {
            levels: cfg.levels.clone(),
        }
    }

    /// Number of codes, the product of the levels.
    pub fn n_embed(&self) -> usize {
        self.levels.iter().product()
    }

    /// A per-channel constant as a `[1, d]` row.
    fn row(&self, f: impl Fn(usize) -> f64, device: &Device) -> Tensor<2> {
        let values: Vec<f32> = self.levels.iter().map(|&l| f(l) as f32).collect();
        Tensor::from_data(TensorData::new(values, [1, self.levels.len()]), device)
    }

    /// Quantizes `[b, d, h, w]` (`d` = the number of levels).
    pub fn forward(&self, z: Tensor<4>) -> Quantized {
        let [b, _, h, w] = z.dims();
        let device = z.device();
        let rows = to_rows(z);
        let half_l = |l: usize| (l - 1) as f64 * (1.0 + EPS) / 2.0;
        let offset = |l: usize| if l.is_multiple_of(2) { 0.5 } else { 0.0 };
        let shift = self.row(|l| (offset(l) / half_l(l)).atanh(), &device);
        let bounded = (rows + shift).tanh() * self.row(half_l, &device) - self.row(offset, &device);
        // Rounded with straight-through gradients.
        let rounded = bounded.clone() + (bounded.clone().round() - bounded).detach();
        let half_width = self.row(|l| (l / 2) as f64, &device);
        let codes = rounded.clone() / half_width.clone();
        let indices = self.indices_of(rounded.detach() + half_width, [b, h, w]);
        Quantized {
            z_q: from_rows(codes.clone(), [b, h, w]),
            loss: Tensor::zeros([1], &device),
            indices,
            lookup_latents: codes.detach(),
        }
    }

    /// Indices `[b, h, w]` of per-channel level numbers `[n, d]` (in 0..levels).
    fn indices_of(&self, levels: Tensor<2>, [b, h, w]: [usize; 3]) -> Tensor<3, Int> {
        let basis = self.basis(&levels.device());
        (levels * basis).sum_dim(1).round().int().reshape([b, h, w])
    }

    /// The mixed-radix place values: 1, levels[0], levels[0] * levels[1], ...
    fn places(&self) -> Vec<usize> {
        let mut place = 1;
        self.levels
            .iter()
            .map(|&l| {
                let p = place;
                place *= l;
                p
            })
            .collect()
    }

    /// [`Self::places`] as a `[1, d]` row.
    fn basis(&self, device: &Device) -> Tensor<2> {
        let values: Vec<f32> = self.places().into_iter().map(|p| p as f32).collect();
        Tensor::from_data(TensorData::new(values, [1, self.levels.len()]), device)
    }

    /// Codes for indices `[b, h, w]`, as `[b, d, h, w]` in [-1, 1].
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let flat = indices.reshape([b * h * w, 1]);
        let channels: Vec<Tensor<2>> = self
            .levels
            .iter()
            .zip(self.places())
            .map(|(&l, place)| {
                let level = flat
                    .clone()
                    .div_scalar(place as i64)
                    .remainder_scalar(l as i64);
                let half = (l / 2) as f64;
                level.float().sub_scalar(half).div_scalar(half)
            })
            .collect();
        from_rows(Tensor::cat(channels, 1), [b, h, w])
    }
}
