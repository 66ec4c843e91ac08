//! Autoregressive sampling: temperature, top-k and top-p over the image codes, batched, with
//! or without the KV cache (the reference's `sample` recomputes the whole sequence for every
//! token; the cached path feeds one new position per token).

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::gpt::{Gpt, KvCache};
use super::layout::TokenLayout;
use crate::error::ModelError;

/// How a token is drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by this; 0 means greedy (the most likely code).
    pub temperature: f64,
    /// Keep only the k most likely codes.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely codes whose probability reaches p.
    pub top_p: Option<f64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    /// Refuses settings that cannot apply to `n_codes` image codes; errors name the option.
    pub fn validate(&self, n_codes: usize) -> Result<(), ModelError> {
        let bad = |key: &str, reason: String| ModelError::Config {
            key: key.into(),
            reason,
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "temperature",
                format!("{} must be >= 0", self.temperature),
            ));
        }
        if let Some(k) = self.top_k
            && (k == 0 || k > n_codes)
        {
            return Err(bad(
                "top_k",
                format!("{k} is not in 1..={n_codes} (the codebook size)"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(bad("top_p", format!("{p} is not in (0, 1]")));
        }
        Ok(())
    }

    /// Draws a code from `logits` (one per code).
    pub fn pick(&self, logits: &[f32], rng: &mut StdRng) -> usize {
        let argmax = || {
            (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .expect("non-empty logits")
        };
        if self.temperature == 0.0 || self.top_k == Some(1) {
            return argmax();
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(self.top_k.unwrap_or(logits.len()));
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.temperature).exp())
            .collect();
        if let Some(p) = self.top_p {
            let total: f64 = probs.iter().sum();
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    acc += q / total;
                    acc >= p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (q, &i) in probs.iter().zip(&order) {
            if u < *q {
                return i;
            }
            u -= q;
        }
        order[probs.len() - 1]
    }
}

/// The last position's logits of each row of `[b, t, vocab]`, cut to the image codes.
pub(crate) fn last_logits(logits: Tensor<3>, n_codes: usize) -> Vec<Vec<f32>> {
    let [b, t, _] = logits.dims();
    let last = logits.narrow(1, t - 1, 1).narrow(2, 0, n_codes);
    let flat: Vec<f32> = last.try_into_vec_as::<f32>().expect("f32 logits");
    flat.chunks(n_codes).take(b).map(<[f32]>::to_vec).collect()
}

/// Samples a window of image codes after each cond sequence of `conds` (embedding rows, one
/// sequence per image, all of the layout's cond length); returns each image's codes in
/// raster order.
pub fn sample_window(
    gpt: &Gpt,
    layout: &TokenLayout,
    conds: &[Vec<i64>],
    sampling: Sampling,
    seed: u64,
    cached: bool,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let n_codes = layout.config().n_embed;
    sampling.validate(n_codes)?;
    let cond_len = layout.config().cond_len();
    if let Some(c) = conds.iter().find(|c| c.len() != cond_len) {
        return Err(ModelError::Config {
            key: "cond".into(),
            reason: format!("{} cond tokens given, the model takes {cond_len}", c.len()),
        });
    }
    let device = gpt.pos_emb.val().device();
    let b = conds.len();
    let n = layout.config().window_tokens();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seqs: Vec<Vec<i64>> = conds.to_vec();
    let mut cache = KvCache::default();
    let to_tensor = |rows: Vec<i64>, t: usize| -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(rows, [b, t]), &device)
    };
    for s in 0..n {
        let logits = if !cached {
            let len = cond_len + s;
            gpt.forward(to_tensor(seqs.concat(), len))
        } else if s == 0 {
            gpt.forward_cached(to_tensor(seqs.concat(), cond_len), &mut cache)
        } else {
            let last = seqs.iter().map(|q| *q.last().expect("token")).collect();
            gpt.forward_cached(to_tensor(last, 1), &mut cache)
        };
        for (seq, row) in seqs.iter_mut().zip(last_logits(logits, n_codes)) {
            seq.push(sampling.pick(&row, &mut rng) as i64);
        }
    }
    Ok(seqs
        .into_iter()
        .map(|s| layout.permutation().backward(&s[cond_len..]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_keep_only_the_likely_codes() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 1.0];
        let mut rng = StdRng::seed_from_u64(1);
        let k2 = Sampling {
            top_k: Some(2),
            ..Sampling::default()
        };
        let p = Sampling {
            top_p: Some(0.5),
            ..Sampling::default()
        };
        for _ in 0..200 {
            assert!([1, 2].contains(&k2.pick(&logits, &mut rng)));
            assert_eq!(p.pick(&logits, &mut rng), 1);
        }
        assert_eq!(Sampling::GREEDY.pick(&logits, &mut rng), 1);
    }

    #[test]
    fn temperature_spreads_the_draws() {
        let logits = [1.0f32, 0.0];
        let mut rng = StdRng::seed_from_u64(2);
        let hot = Sampling {
            temperature: 100.0,
            ..Sampling::default()
        };
        let ones = (0..2000)
            .filter(|_| hot.pick(&logits, &mut rng) == 1)
            .count();
        assert!((900..1100).contains(&ones), "{ones}");
    }

    #[test]
    fn refuses_top_k_beyond_the_codebook() {
        let s = Sampling {
            top_k: Some(300),
            ..Sampling::default()
        };
        let err = s.validate(256).unwrap_err().to_string();
        assert!(err.contains("top_k") && err.contains("256"), "{err}");
    }
}
