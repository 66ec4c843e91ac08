//! Lookup-free quantization (Yu et al. 2023, MAGVIT-v2) as vector-quantize-pytorch 1.32's `LFQ`
//! computes it with no projection: each of the `embed_dim` latent channels is quantized to its
//! sign (-1 or 1), straight through while training; a code's index is the binary number of
//! its positive channels, the first channel most significant. While training, the loss is
//! `entropy_weight x (per-sample entropy - diversity_gamma x codebook entropy)` of the
//! softmax over all `2^embed_dim` codes of `2 x.c x inv_temperature`, plus
//! `commitment_weight x |x - sg[q]|^2`; the per-sample term makes each latent sure of its code,
//! the codebook term spreads the batch over all codes. In a data-parallel group the codebook
//! entropy is that of the whole batch: the code probabilities are averaged over the ranks
//! (as vector-quantize-pytorch's distributed mean does), and each rank's gradient is the
//! whole batch's, which the gradient mean then shares out.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{GroupMean, QuantizeMode, Quantized, from_rows, to_rows};
use crate::config::LfqConfig;

/// Probabilities under this are clamped before their log, as the reference's `log`.
const LOG_EPS: f64 = 1e-5;

/// `mean` (`[1, codes]`) averaged over the group's ranks, its gradient passed straight to this
/// rank's; itself without a group (or when the collective fails).
fn across(mean: Tensor<2>, group: Option<&dyn GroupMean>) -> Tensor<2> {
    let Some(group) = group else {
        return mean;
    };
    let mut values = mean
        .clone()
        .try_into_vec_as::<f32>()
        .expect("f32 probabilities");
    if !group.mean(&mut values) {
        return mean;
    }
    let shape = mean.dims();
    let all = Tensor::from_data(TensorData::new(values, shape), &mean.device());
    mean.clone() + (all - mean).detach()
}

/// The LFQ quantizer for `bits`-channel latents (`2^bits` codes).
#[derive(Module, Debug)]
pub struct LfqQuantizer {
    bits: usize,
    entropy_weight: f64,
    diversity_gamma: f64,
    commitment_weight: f64,
    inv_temperature: f64,
}

impl LfqQuantizer {
    /// A quantizer for `embed_dim`-channel latents.
    pub fn new(embed_dim: usize, cfg: &LfqConfig) -> Self {
        Self {
            bits: embed_dim,
            entropy_weight: cfg.entropy_weight,
            diversity_gamma: cfg.diversity_gamma,
            commitment_weight: cfg.commitment_weight,
            inv_temperature: cfg.inv_temperature,
        }
    }

    /// Number of codes, `2^bits`.
    pub fn n_embed(&self) -> usize {
        1 << self.bits
    }

    /// Place values `[1, bits]`: 2^(bits-1), ..., 2, 1.
    fn place_values(&self, device: &Device) -> Tensor<2> {
        let values: Vec<f32> = (0..self.bits)
            .map(|i| (1u64 << (self.bits - 1 - i)) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, [1, self.bits]), device)
    }

    /// Every code, `[2^bits, bits]`, row `k` the code of index `k` ([`Self::lookup`] of
    /// all indices).
    fn codebook(&self, device: &Device) -> Tensor<2> {
        let n = self.n_embed();
        let all = Tensor::<1, Int>::arange(0..n as i64, device).reshape([1, 1, n]);
        self.lookup(all).reshape([self.bits, n]).transpose()
    }

    /// Quantizes `[b, bits, h, w]`.
    pub fn forward(&self, z: Tensor<4>, mode: QuantizeMode) -> Quantized {
        let [b, _, h, w] = z.dims();
        let device = z.device();
        let x = to_rows(z);
        let positive = x.clone().greater_elem(0.0).float();
        let q = positive.clone().mul_scalar(2.0).sub_scalar(1.0);
        let indices = (positive * self.place_values(&device))
            .sum_dim(1)
            .int()
            .reshape([b, h, w]);
        if !mode.training {
            return Quantized {
                z_q: from_rows(q.clone(), [b, h, w]),
                loss: Tensor::zeros([1], &device),
                indices,
                lookup_latents: q,
            };
        }
        let loss = self.loss(x.clone(), q.clone(), mode.group);
        let z_q = x.clone() + (q.clone() - x).detach();
        Quantized {
            z_q: from_rows(z_q, [b, h, w]),
            loss,
            indices,
            lookup_latents: q.detach(),
        }
    }

    /// The entropy terms and the commitment term, weighted, `[1]`.
    fn loss(&self, x: Tensor<2>, q: Tensor<2>, group: Option<&dyn GroupMean>) -> Tensor<1> {
        let codebook = self.codebook(&x.device());
        let logits = x
            .clone()
            .matmul(codebook.transpose())
            .mul_scalar(2.0 * self.inv_temperature);
        let prob = softmax(logits, 1);
        let entropy = |p: Tensor<2>| -> Tensor<2> {
            (p.clone() * p.clamp_min(LOG_EPS).log()).sum_dim(1).neg()
        };
        let per_sample = entropy(prob.clone()).mean();
        let codebook_entropy = entropy(across(prob.mean_dim(0), group)).mean();
        let commitment = (x - q.detach()).powi_scalar(2).mean();
        (per_sample - codebook_entropy.mul_scalar(self.diversity_gamma))
            .mul_scalar(self.entropy_weight)
            + commitment.mul_scalar(self.commitment_weight)
    }

    /// Codes for indices `[b, h, w]`, as `[b, bits, h, w]` of -1 and 1.
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let flat = indices.reshape([b * h * w, 1]);
        let channels: Vec<Tensor<2>> = (0..self.bits)
            .map(|i| {
                let place = 1i64 << (self.bits - 1 - i);
                let bit = flat.clone().div_scalar(place).remainder_scalar(2);
                bit.float().mul_scalar(2.0).sub_scalar(1.0)
            })
            .collect();
        from_rows(Tensor::cat(channels, 1), [b, h, w])
    }
}
