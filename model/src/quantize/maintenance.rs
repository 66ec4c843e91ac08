//! Codebook-collapse remedies run between training steps: k-means initialization from the
//! first batches, dead-code restart from batch samples, and codebook usage over a window of
//! recent tokens.

use std::collections::VecDeque;

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::vector::VectorQuantizer;
use super::{l2_normalize, squared_distances};
use crate::config::VectorQuantizerConfig;

/// Fraction of codes used by the last `capacity` tokens.
#[derive(Debug, Clone)]
pub struct UsageWindow {
    capacity: usize,
    tokens: VecDeque<u32>,
    counts: Vec<u32>,
    distinct: usize,
}

impl UsageWindow {
    /// A window over the last `capacity` tokens of an `n_embed`-code codebook.
    pub fn new(n_embed: usize, capacity: usize) -> Self {
        Self {
            capacity,
            tokens: VecDeque::with_capacity(capacity),
            counts: vec![0; n_embed],
            distinct: 0,
        }
    }

    /// Adds tokens, forgetting the oldest beyond the capacity.
    pub fn observe(&mut self, indices: &[i64]) {
        for &i in indices {
            if self.tokens.len() == self.capacity
                && let Some(old) = self.tokens.pop_front()
            {
                self.counts[old as usize] -= 1;
                if self.counts[old as usize] == 0 {
                    self.distinct -= 1;
                }
            }
            let i = i as usize;
            if self.counts[i] == 0 {
                self.distinct += 1;
            }
            self.counts[i] += 1;
            self.tokens.push_back(i as u32);
        }
    }

    /// Distinct codes in the window divided by the codebook size.
    pub fn usage(&self) -> f64 {
        self.distinct as f64 / self.counts.len() as f64
    }

    /// Tokens currently in the window.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token has been observed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The part of a [`CodebookMaintainer`] that a checkpoint keeps: the usage window, the
/// per-code use averages and whether k-means has run. (Batches pooled for a k-means that has
/// not run yet are not kept: pooling restarts after a resume.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaintainerState {
    /// Tokens in the usage window, oldest first.
    pub window: Vec<u32>,
    /// Moving-average use per code.
    pub use_ema: Vec<f64>,
    /// Whether the k-means initialization is done (or not configured).
    pub kmeans_done: bool,
}

/// What one maintenance step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaintenanceReport {
    /// Whether the codebook was just set by k-means.
    pub kmeans_done: bool,
    /// Codes restarted from batch samples.
    pub restarted: Vec<usize>,
    /// Codebook usage over the window after this step.
    pub usage: f64,
}

/// Runs the configured codebook remedies after each training step of a vector quantizer.
#[derive(Debug)]
pub struct CodebookMaintainer {
    cfg: VectorQuantizerConfig,
    usage: UsageWindow,
    use_ema: Vec<f64>,
    pending: Vec<Tensor<2>>,
    kmeans_done: bool,
    rng: StdRng,
}

impl CodebookMaintainer {
    /// A maintainer for an `n_embed`-code quantizer configured by `cfg`.
    pub fn new(cfg: &VectorQuantizerConfig, n_embed: usize, seed: u64) -> Self {
        Self {
            cfg: cfg.clone(),
            usage: UsageWindow::new(n_embed, cfg.usage_window),
            use_ema: vec![1.0; n_embed],
            pending: Vec::new(),
            kmeans_done: cfg.kmeans_init.is_none(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Codebook usage over the recent-token window.
    pub fn usage(&self) -> f64 {
        self.usage.usage()
    }

    /// Reseeds the random choices (restart samples, k-means init); trainers reseed from
    /// (seed, step) so that a resumed run draws what an uninterrupted one would.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// The state to checkpoint.
    pub fn state(&self) -> MaintainerState {
        MaintainerState {
            window: self.usage.tokens.iter().copied().collect(),
            use_ema: self.use_ema.clone(),
            kmeans_done: self.kmeans_done,
        }
    }

    /// Restores a checkpointed state.
    pub fn restore(&mut self, state: &MaintainerState) {
        let window: Vec<i64> = state.window.iter().map(|&t| t as i64).collect();
        self.usage = UsageWindow::new(self.use_ema.len(), self.cfg.usage_window);
        self.usage.observe(&window);
        self.use_ema = state.use_ema.clone();
        self.kmeans_done = state.kmeans_done;
        self.pending.clear();
    }

    /// One step: EMA update, k-means once enough batches are pooled, dead-code restart, usage.
    /// `latents` are the batch's lookup-space latents `[n, d]` and `indices` their codes `[n]`.
    pub fn step(
        &mut self,
        quantizer: VectorQuantizer,
        latents: Tensor<2>,
        indices: Tensor<1, Int>,
    ) -> (VectorQuantizer, MaintenanceReport) {
        let host: Vec<i64> = indices
            .clone()
            .try_into_vec_as::<i64>()
            .expect("int indices");
        let mut report = MaintenanceReport::default();
        let mut q = match &self.cfg.ema {
            Some(ema) => quantizer.ema_update(latents.clone(), indices, ema.decay, ema.eps),
            None => quantizer,
        };
        if !self.kmeans_done {
            q = self.pool_for_kmeans(q, latents.clone(), &mut report);
        }
        if let Some(restart) = self.cfg.dead_code_restart.clone() {
            self.track_use(&host, restart.decay);
            let dead: Vec<usize> = (0..self.use_ema.len())
                .filter(|&c| self.use_ema[c] < restart.threshold)
                .collect();
            if !dead.is_empty() {
                q = self.restart(q, latents, &dead);
                report.restarted = dead;
            }
        }
        self.usage.observe(&host);
        report.usage = self.usage.usage();
        (q, report)
    }

    fn pool_for_kmeans(
        &mut self,
        q: VectorQuantizer,
        latents: Tensor<2>,
        report: &mut MaintenanceReport,
    ) -> VectorQuantizer {
        let Some(k) = self.cfg.kmeans_init.clone() else {
            return q;
        };
        self.pending.push(latents);
        if self.pending.len() < k.batches {
            return q;
        }
        let pooled = Tensor::cat(std::mem::take(&mut self.pending), 0);
        let centers = kmeans(pooled, q.n_embed(), k.iters, self.cfg.cosine, &mut self.rng);
        self.kmeans_done = true;
        report.kmeans_done = true;
        q.with_codebook(centers)
    }

    fn track_use(&mut self, indices: &[i64], decay: f64) {
        let mut counts = vec![0.0; self.use_ema.len()];
        for &i in indices {
            counts[i as usize] += 1.0;
        }
        for (ema, count) in self.use_ema.iter_mut().zip(counts) {
            *ema = decay * *ema + (1.0 - decay) * count;
        }
    }

    /// Replaces each dead code with a randomly chosen latent of the batch. Only the dead
    /// codes' rows are drawn from the batch, so any ratio of codes to latents works.
    fn restart(
        &mut self,
        q: VectorQuantizer,
        latents: Tensor<2>,
        dead: &[usize],
    ) -> VectorQuantizer {
        let [rows, d] = latents.dims();
        let device = latents.device();
        let n = q.n_embed();
        let mut keep = vec![1.0f32; n];
        let mut picks = Vec::with_capacity(dead.len());
        for &c in dead {
            picks.push(self.rng.random_range(0..rows) as i64);
            keep[c] = 0.0;
            self.use_ema[c] = 1.0;
        }
        let ints = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        let samples = latents.select(0, ints(picks));
        let dead_rows = ints(dead.iter().map(|&c| c as i64).collect());
        // The samples at their codes' rows, zero elsewhere: w * keep + placed is exact.
        let placed = Tensor::<2>::zeros([n, d], &device).select_assign(
            0,
            dead_rows,
            samples,
            burn::tensor::IndexingUpdateOp::Add,
        );
        let keep = Tensor::<2>::from_data(TensorData::new(keep, [n, 1]), &device);
        let codes = q.embedding.weight.val() * keep + placed;
        q.with_codebook(codes.detach())
    }
}

/// k-means (Lloyd) over the rows of `x` `[n, d]`: `k` centers initialized from distinct
/// random rows (with repeats only when `n < k`); an empty cluster keeps its center.
pub fn kmeans(x: Tensor<2>, k: usize, iters: usize, cosine: bool, rng: &mut StdRng) -> Tensor<2> {
    let x = if cosine { l2_normalize(x) } else { x };
    let [n, d] = x.dims();
    let device = x.device();
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let init: Vec<i64> = (0..k).map(|i| order[i % n]).collect();
    let mut centers = x
        .clone()
        .select(0, Tensor::from_data(TensorData::new(init, [k]), &device));
    let ones = Tensor::<1>::ones([n], &device);
    for _ in 0..iters {
        let assign = squared_distances(x.clone(), centers.clone())
            .argmin(1)
            .reshape([n]);
        let sums = Tensor::<2>::zeros([k, d], &device).select_assign(
            0,
            assign.clone(),
            x.clone(),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let counts = Tensor::<1>::zeros([k], &device).select_assign(
            0,
            assign,
            ones.clone(),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let empty = counts.clone().equal_elem(0.0).reshape([k, 1]).float();
        let means = sums / counts.clamp_min(1.0).reshape([k, 1]);
        centers = means * empty.clone().neg().add_scalar(1.0) + centers * empty;
        if cosine {
            centers = l2_normalize(centers);
        }
    }
    centers
}
