//! High-resolution sampling: a token grid larger than the training window, filled in raster
//! order with the reference's sliding-window rule. For token (i, j) of an H x W grid with a
//! `wh x ww` window, the window's local row is `i` when `i <= wh/2`, `wh - (H - i)` when
//! `H - i < wh/2`, else `wh/2` (columns likewise); the model sees the aligned window of cond
//! tokens and the window's image tokens, and the token is drawn from the logits at its local
//! position.
//!
//! [`WindowMode::Plain`] runs the whole window for every token, as the reference does.
//! [`WindowMode::Reuse`] keeps a KV cache per window placement and, when a placement comes
//! back (the same rows one grid row later, or the same columns at the edges), recomputes only
//! from the first token that changed since: the same tokens, fewer positions computed.

use std::collections::HashMap;

use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::config::PermuterKind;
use super::gpt::{Gpt, KvCache};
use super::layout::TokenLayout;
use super::sample::{Sampling, last_logits};
use crate::error::ModelError;

/// How each window is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowMode {
    /// A full forward pass per token (the reference's rule).
    Plain,
    /// Per-placement KV caches, recomputing from the first changed token.
    Reuse,
}

/// What the grid is conditioned on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GridCond {
    /// The same cond rows for every window (SOS token or class label).
    Fixed(Vec<i64>),
    /// Cond rows of the whole grid, raster order (segmentation codes).
    Spatial(Vec<i64>),
}

/// The local coordinate of grid coordinate `i` on an axis of `size` tokens with a window of
/// `win` tokens (the reference's rule).
pub fn local(i: usize, size: usize, win: usize) -> usize {
    let half = win / 2;
    if i <= half {
        i
    } else if size - i < half {
        win - (size - i)
    } else {
        half
    }
}

/// Samples an `[h, w]` grid; returns its codes in raster order.
pub fn sample_grid(
    gpt: &Gpt,
    layout: &TokenLayout,
    [h, w]: [usize; 2],
    cond: &GridCond,
    sampling: Sampling,
    seed: u64,
    mode: WindowMode,
) -> Result<Vec<i64>, ModelError> {
    let config = layout.config();
    let [wh, ww] = config.window;
    let bad = |key: &str, reason: String| ModelError::Config {
        key: key.into(),
        reason,
    };
    if h < wh || w < ww {
        return Err(bad(
            "grid",
            format!("{h}x{w} tokens is smaller than the model's {wh}x{ww} window"),
        ));
    }
    if config.permuter != PermuterKind::Identity {
        return Err(bad(
            "permuter",
            "sliding-window sampling needs the raster (identity) order".into(),
        ));
    }
    sampling.validate(config.n_embed)?;
    match cond {
        GridCond::Fixed(c) if c.len() != config.cond_len() => {
            return Err(bad(
                "cond",
                format!(
                    "{} cond tokens for a model that takes {}",
                    c.len(),
                    config.cond_len()
                ),
            ));
        }
        GridCond::Spatial(c) if c.len() != h * w => {
            return Err(bad(
                "cond",
                format!("{} cond codes for a {h}x{w} grid", c.len()),
            ));
        }
        _ => {}
    }
    let mut sampler = WindowSampler {
        gpt,
        layout,
        grid: [h, w],
        cond,
        tokens: vec![0; h * w],
        caches: HashMap::new(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..h {
        for j in 0..w {
            let logits = sampler.logits_at(i, j, mode);
            sampler.tokens[i * w + j] = sampling.pick(&logits, &mut rng) as i64;
        }
    }
    Ok(sampler.tokens)
}

struct WindowSampler<'a> {
    gpt: &'a Gpt,
    layout: &'a TokenLayout,
    grid: [usize; 2],
    cond: &'a GridCond,
    tokens: Vec<i64>,
    caches: HashMap<(usize, usize), (Vec<i64>, KvCache)>,
}

impl WindowSampler<'_> {
    /// The window's sequence (cond rows, then image tokens) at placement `(r0, c0)`.
    fn sequence(&self, r0: usize, c0: usize) -> Vec<i64> {
        let [wh, ww] = self.layout.config().window;
        let w = self.grid[1];
        let patch = |src: &[i64]| -> Vec<i64> {
            (r0..r0 + wh)
                .flat_map(|r| src[r * w + c0..r * w + c0 + ww].iter().copied())
                .collect()
        };
        let mut seq = match self.cond {
            GridCond::Fixed(c) => c.clone(),
            GridCond::Spatial(c) => patch(c),
        };
        seq.extend(patch(&self.tokens));
        seq
    }

    fn logits_at(&mut self, i: usize, j: usize, mode: WindowMode) -> Vec<f32> {
        let config = self.layout.config();
        let [wh, ww] = config.window;
        let [h, w] = self.grid;
        let (li, lj) = (local(i, h, wh), local(j, w, ww));
        let (r0, c0) = (i - li, j - lj);
        let p = li * ww + lj;
        let mut seq = self.sequence(r0, c0);
        let device = self.gpt.pos_emb.val().device();
        let tensor = |rows: &[i64]| -> Tensor<2, Int> {
            Tensor::from_data(TensorData::new(rows.to_vec(), [1, rows.len()]), &device)
        };
        // Logits for image position p sit at sequence index cond_len + p - 1.
        let needed = config.cond_len() + p;
        let n_codes = config.n_embed;
        match mode {
            WindowMode::Plain => {
                seq.pop();
                let logits = self.gpt.forward(tensor(&seq)).narrow(1, needed - 1, 1);
                last_logits(logits, n_codes).remove(0)
            }
            WindowMode::Reuse => {
                seq.truncate(needed);
                self.caches.retain(|&(r, _), _| r >= r0);
                let (held, cache) = self.caches.entry((r0, c0)).or_default();
                let same = held.iter().zip(&seq).take_while(|(a, b)| a == b).count();
                let keep = same.min(needed - 1);
                cache.truncate(keep);
                let logits = self.gpt.forward_cached(tensor(&seq[keep..]), cache);
                *held = seq;
                last_logits(logits, n_codes).remove(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local;

    #[test]
    fn placement_follows_the_reference_rule() {
        // 16-token window on a 32-token axis: 0..=8 at the start, 8 in the middle, the
        // window pinned to the end for the last 7.
        let got: Vec<usize> = (0..32).map(|i| local(i, 32, 16)).collect();
        let mut want: Vec<usize> = (0..=8).collect();
        want.extend(std::iter::repeat_n(8, 16));
        want.extend(9..16);
        assert_eq!(got, want);
        // A grid as large as the window: the local coordinate is the grid coordinate.
        assert!((0..16).all(|i| local(i, 16, 16) == i));
    }
}
