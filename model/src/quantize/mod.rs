//! Quantizers between `quant_conv` and `post_quant_conv`, and codebook maintenance.

pub mod fsq;
pub mod gumbel;
pub mod lfq;
pub mod maintenance;
pub mod simvq;
pub mod vector;

use burn::module::Module;
use burn::tensor::{Int, Tensor};

pub use fsq::FsqQuantizer;
pub use gumbel::GumbelQuantizer;
pub use lfq::LfqQuantizer;
pub use maintenance::{CodebookMaintainer, MaintainerState, UsageWindow};
pub use simvq::SimVqQuantizer;
pub use vector::VectorQuantizer;

/// What a quantizer returns for a latent map `[b, d, h, w]`.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Quantized latents `[b, embed_dim, h, w]`, with straight-through gradients to the input.
    pub z_q: Tensor<4>,
    /// Quantizer loss (commitment + codebook, or the Gumbel KL term), shape `[1]`.
    pub loss: Tensor<1>,
    /// Code indices `[b, h, w]`.
    pub indices: Tensor<3, Int>,
    /// Detached latents in lookup space `[b*h*w, code_dim]`, for codebook maintenance.
    pub lookup_latents: Tensor<2>,
}

/// How a quantizer should run.
#[derive(Clone, Copy)]
pub struct QuantizeMode<'a> {
    /// Training (stochastic Gumbel sampling, LFQ's entropy terms) or evaluation
    /// (deterministic).
    pub training: bool,
    /// Gumbel temperature (ignored by the vector quantizer).
    pub temperature: f64,
    /// The data-parallel group, for statistics of the whole batch across ranks (LFQ's
    /// codebook entropy); none: this process's batch is the whole batch.
    pub group: Option<&'a dyn GroupMean>,
}

impl std::fmt::Debug for QuantizeMode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizeMode")
            .field("training", &self.training)
            .field("temperature", &self.temperature)
            .field("group", &self.group.is_some())
            .finish()
    }
}

/// Averages values over the ranks of a data-parallel group: a collective that every rank
/// calls at the same point of the same forward pass.
pub trait GroupMean {
    /// Replaces `values` by their mean over the ranks; false when the collective failed
    /// (`values` then hold this rank's own, and the step's gradient mean fails the attempt).
    fn mean(&self, values: &mut [f32]) -> bool;
}

impl QuantizeMode<'static> {
    /// Deterministic evaluation.
    pub const EVAL: Self = Self {
        training: false,
        temperature: 1.0,
        group: None,
    };
}

/// The configured quantizer. Checkpoint paths skip the variant name
/// (`quantize.embedding.weight`, `quantize.proj.weight`).
// One quantizer per model: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Quantizer {
    /// Nearest-code vector quantization.
    Vector(VectorQuantizer),
    /// Gumbel-softmax quantization.
    Gumbel(GumbelQuantizer),
    /// Finite scalar quantization (no codebook).
    Fsq(FsqQuantizer),
    /// A frozen random codebook through a learned linear map.
    SimVq(SimVqQuantizer),
    /// Lookup-free (sign) quantization with entropy terms.
    Lfq(LfqQuantizer),
}

impl Quantizer {
    /// Quantizes a latent map `[b, embed_dim, h, w]`.
    pub fn forward(&self, z: Tensor<4>, mode: QuantizeMode) -> Quantized {
        match self {
            Self::Vector(q) => q.forward(z),
            Self::Gumbel(q) => q.forward(z, mode),
            Self::Fsq(q) => q.forward(z),
            Self::SimVq(q) => q.forward(z),
            Self::Lfq(q) => q.forward(z, mode),
        }
    }

    /// Code vectors for indices `[b, h, w]`, as `[b, embed_dim, h, w]`.
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        match self {
            Self::Vector(q) => q.lookup(indices),
            Self::Gumbel(q) => q.lookup(indices),
            Self::Fsq(q) => q.lookup(indices),
            Self::SimVq(q) => q.lookup(indices),
            Self::Lfq(q) => q.lookup(indices),
        }
    }

    /// Number of codes.
    pub fn n_embed(&self) -> usize {
        match self {
            Self::Vector(q) => q.n_embed(),
            Self::Gumbel(q) => q.n_embed(),
            Self::Fsq(q) => q.n_embed(),
            Self::SimVq(q) => q.n_embed(),
            Self::Lfq(q) => q.n_embed(),
        }
    }
}

/// `exp(entropy)` of the code histogram of `indices`: the reference's per-batch perplexity.
pub fn perplexity(indices: &[i64], n_embed: usize) -> f64 {
    let mut counts = vec![0usize; n_embed];
    for &i in indices {
        counts[i as usize] += 1;
    }
    let total = indices.len().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .map(|&c| {
            let p = c as f64 / total;
            -p * (p + 1e-10).ln()
        })
        .sum();
    entropy.exp()
}

/// Moves a channel-first map `[b, d, h, w]` to rows `[b*h*w, d]`.
pub(crate) fn to_rows(z: Tensor<4>) -> Tensor<2> {
    let [b, d, h, w] = z.dims();
    z.permute([0, 2, 3, 1]).reshape([b * h * w, d])
}

/// Moves rows `[b*h*w, d]` back to a channel-first map `[b, d, h, w]`.
pub(crate) fn from_rows(rows: Tensor<2>, [b, h, w]: [usize; 3]) -> Tensor<4> {
    let [_, d] = rows.dims();
    rows.reshape([b, h, w, d]).permute([0, 3, 1, 2])
}

/// Scales each row to unit l2 norm.
pub(crate) fn l2_normalize(rows: Tensor<2>) -> Tensor<2> {
    let norm = rows
        .clone()
        .powi_scalar(2)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    rows / norm
}

/// Squared l2 distances `[n, k]` between rows of `x` `[n, d]` and `codes` `[k, d]`, in the
/// reference's expanded form `|x|^2 + |e|^2 - 2 x.e`.
pub(crate) fn squared_distances(x: Tensor<2>, codes: Tensor<2>) -> Tensor<2> {
    let xx = x.clone().powi_scalar(2).sum_dim(1);
    let ee = codes.clone().powi_scalar(2).sum_dim(1).transpose();
    xx + ee - x.matmul(codes.transpose()).mul_scalar(2.0)
}
