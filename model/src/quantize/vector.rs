//! Nearest-code vector quantization with straight-through gradients, as the reference's
//! VectorQuantizer, plus cosine codes, a low-dimensional lookup and EMA updates.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};

use super::{Quantized, from_rows, l2_normalize, squared_distances, to_rows};
use crate::config::{Estimator, VectorQuantizerConfig};

/// EMA codebook statistics (the reference's `cluster_size` and `embed_avg` buffers).
#[derive(Module, Debug)]
pub struct EmaStats {
    /// Moving average of tokens assigned to each code, `[n_embed]`.
    pub cluster_size: Param<Tensor<1>>,
    /// Moving average of the sum of vectors assigned to each code, `[n_embed, code_dim]`.
    pub embed_avg: Param<Tensor<2>>,
}

/// Vector quantizer. The codebook is `embedding.weight`, `[n_embed, code_dim]`, where
/// `code_dim` is `codebook_dim` when a low-dimensional lookup is configured, else `embed_dim`.
#[derive(Module, Debug)]
pub struct VectorQuantizer {
    /// The codebook.
    pub embedding: Embedding,
    /// Projection into the lookup space (low-dimensional lookup only).
    pub proj_in: Option<Linear>,
    /// Projection back to `embed_dim` (low-dimensional lookup only).
    pub proj_out: Option<Linear>,
    /// EMA statistics (EMA updates only).
    pub ema: Option<EmaStats>,
    beta: f64,
    legacy: bool,
    cosine: bool,
    rotation: bool,
}

impl VectorQuantizer {
    /// A quantizer with `n_embed` codes for `embed_dim`-channel latents, codebook drawn from
    /// U(-1/n, 1/n) as in the reference.
    pub fn new(
        n_embed: usize,
        embed_dim: usize,
        cfg: &VectorQuantizerConfig,
        device: &Device,
    ) -> Self {
        let code_dim = cfg.codebook_dim.unwrap_or(embed_dim);
        let bound = 1.0 / n_embed as f64;
        let embedding = EmbeddingConfig::new(n_embed, code_dim)
            .with_initializer(Initializer::Uniform {
                min: -bound,
                max: bound,
            })
            .init(device);
        let low_dim = cfg.codebook_dim.is_some();
        let proj_in = low_dim.then(|| LinearConfig::new(embed_dim, code_dim).init(device));
        let proj_out = low_dim.then(|| LinearConfig::new(code_dim, embed_dim).init(device));
        let ema = cfg.ema.as_ref().map(|_| EmaStats {
            // Ones, so that codes = embed_avg / cluster_size holds from the start (zeros, as at
            // the reference's HEAD, blow unused codes up by 1/eps on the first update).
            cluster_size: Param::from_tensor(Tensor::ones([n_embed], device))
                .set_require_grad(false),
            embed_avg: Param::from_tensor(embedding.weight.val()).set_require_grad(false),
        });
        let embedding = if cfg.ema.is_some() {
            Embedding {
                weight: embedding.weight.set_require_grad(false),
            }
        } else {
            embedding
        };
        Self {
            embedding,
            proj_in,
            proj_out,
            ema,
            beta: cfg.beta,
            legacy: cfg.legacy,
            cosine: cfg.cosine,
            rotation: cfg.estimator == Estimator::Rotation,
        }
    }

    /// Number of codes.
    pub fn n_embed(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    /// The codebook as used for lookup (l2-normalized in cosine mode), `[n_embed, code_dim]`.
    pub fn codebook(&self) -> Tensor<2> {
        let codes = self.embedding.weight.val();
        if self.cosine {
            l2_normalize(codes)
        } else {
            codes
        }
    }

    /// Maps latent rows `[n, embed_dim]` into the lookup space.
    pub fn to_lookup_space(&self, rows: Tensor<2>) -> Tensor<2> {
        let rows = match &self.proj_in {
            Some(proj) => proj.forward(rows),
            None => rows,
        };
        if self.cosine {
            l2_normalize(rows)
        } else {
            rows
        }
    }

    fn project_out(&self, rows: Tensor<2>) -> Tensor<2> {
        match &self.proj_out {
            Some(proj) => proj.forward(rows),
            None => rows,
        }
    }

    /// Quantizes `[b, embed_dim, h, w]`.
    pub fn forward(&self, z: Tensor<4>) -> Quantized {
        let [b, _, h, w] = z.dims();
        let latents = self.to_lookup_space(to_rows(z));
        let codebook = self.codebook();
        let indices =
            squared_distances(latents.clone().detach(), codebook.clone().detach()).argmin(1);
        let indices = indices.reshape([b * h * w]);
        let chosen = codebook.select(0, indices.clone());
        let loss = self.loss(latents.clone(), chosen.clone());
        let passed = if self.rotation {
            rotate_to(latents.clone(), chosen)
        } else {
            latents.clone() + (chosen - latents.clone()).detach()
        };
        let z_q = from_rows(self.project_out(passed), [b, h, w]);
        Quantized {
            z_q,
            loss,
            indices: indices.reshape([b, h, w]),
            lookup_latents: latents.detach(),
        }
    }

    /// `beta*|sg[e]-z|^2 + |e-sg[z]|^2` (paper), the swapped form when `legacy`, and only the
    /// commitment term under EMA updates.
    fn loss(&self, latents: Tensor<2>, chosen: Tensor<2>) -> Tensor<1> {
        let commitment = (chosen.clone().detach() - latents.clone())
            .powi_scalar(2)
            .mean();
        if self.ema.is_some() {
            return commitment.mul_scalar(self.beta);
        }
        let codebook = (chosen - latents.detach()).powi_scalar(2).mean();
        if self.legacy {
            commitment + codebook.mul_scalar(self.beta)
        } else {
            codebook + commitment.mul_scalar(self.beta)
        }
    }

    /// Code vectors for indices `[b, h, w]`, as `[b, embed_dim, h, w]`.
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let rows = self.codebook().select(0, indices.reshape([b * h * w]));
        from_rows(self.project_out(rows), [b, h, w])
    }

    /// Replaces the codebook (keeping its parameter id); EMA averages follow when present.
    pub fn with_codebook(mut self, codes: Tensor<2>) -> Self {
        self.embedding.weight = replace(self.embedding.weight, codes.clone());
        if let Some(ema) = self.ema.take() {
            let n = codes.dims()[0];
            let device = codes.device();
            self.ema = Some(EmaStats {
                cluster_size: replace(ema.cluster_size, Tensor::ones([n], &device)),
                embed_avg: replace(ema.embed_avg, codes),
            });
        }
        self
    }

    /// One EMA step from a batch's lookup latents `[n, d]` and their indices `[n]`:
    /// moving averages of counts and sums, Laplace-smoothed counts, codes = sums / counts.
    /// Does nothing when EMA is not configured.
    pub fn ema_update(
        mut self,
        latents: Tensor<2>,
        indices: Tensor<1, Int>,
        decay: f64,
        eps: f64,
    ) -> Self {
        let Some(ema) = self.ema.take() else {
            return self;
        };
        let [n, d] = self.embedding.weight.dims();
        let device = latents.device();
        let [tokens, _] = latents.dims();
        let ones = Tensor::<1>::ones([tokens], &device);
        let counts = Tensor::<1>::zeros([n], &device).select_assign(
            0,
            indices.clone(),
            ones,
            burn::tensor::IndexingUpdateOp::Add,
        );
        let sums = Tensor::<2>::zeros([n, d], &device).select_assign(
            0,
            indices,
            latents,
            burn::tensor::IndexingUpdateOp::Add,
        );
        let cluster = ema.cluster_size.val().mul_scalar(decay) + counts.mul_scalar(1.0 - decay);
        let avg = ema.embed_avg.val().mul_scalar(decay) + sums.mul_scalar(1.0 - decay);
        let total = cluster.clone().sum();
        let smoothed =
            (cluster.clone().add_scalar(eps) / total.clone().add_scalar(n as f64 * eps)) * total;
        let codes = avg.clone() / smoothed.reshape([n, 1]);
        self.embedding.weight = replace(self.embedding.weight, codes);
        self.ema = Some(EmaStats {
            cluster_size: replace(ema.cluster_size, cluster),
            embed_avg: replace(ema.embed_avg, avg),
        });
        self
    }
}

/// The rotation trick as vector-quantize-pytorch's `rotate_to`: each row of `src` rotated
/// (in the plane of it and its target) and scaled onto the row of `tgt`, by a map computed from
/// detached values, so the value is `tgt` and the gradient to `src` goes through the map.
pub fn rotate_to(src: Tensor<2>, tgt: Tensor<2>) -> Tensor<2> {
    const EPS: f64 = 1e-6;
    let norm = |t: &Tensor<2>| t.clone().powi_scalar(2).sum_dim(1).sqrt();
    let (norm_src, norm_tgt) = (norm(&src), norm(&tgt));
    let u = (src.clone() / norm_src.clone().clamp_min(EPS)).detach();
    let q = (tgt / norm_tgt.clone().clamp_min(EPS)).detach();
    let sum = u.clone() + q.clone();
    let w = (sum.clone() / norm(&sum).clamp_min(EPS)).detach();
    let along_w = (src.clone() * w.clone()).sum_dim(1);
    let along_u = (src.clone() * u).sum_dim(1);
    let rotated = src - w * along_w.mul_scalar(2.0) + q * along_u.mul_scalar(2.0);
    rotated * (norm_tgt / norm_src.clamp_min(EPS)).detach()
}

/// A parameter with a new value, keeping its id and whether it tracks gradients.
fn replace<const D: usize>(param: Param<Tensor<D>>, value: Tensor<D>) -> Param<Tensor<D>> {
    param.map(|old| {
        let tracked = old.is_require_grad();
        value.detach().set_require_grad(tracked)
    })
}
