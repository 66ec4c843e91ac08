//! How images and their conditions become token sequences: cond tokens mapped into their
//! embedding range, the image window in the permuter's order, pkeep token dropout, and the
//! loss on the image positions only.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand::rngs::StdRng;

use super::config::{Conditioning, TransformerConfig};
use super::gpt::Gpt;
use super::permuter::Permutation;
use crate::error::ModelError;

/// A condition as given by the user or the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Unconditional (the SOS token).
    None,
    /// A class label.
    Class(i64),
    /// Cond-stage codes of the aligned window, raster order.
    Codes(Vec<i64>),
}

/// A config with its token order, ready to build sequences.
#[derive(Debug, Clone)]
pub struct TokenLayout {
    config: TransformerConfig,
    perm: Permutation,
}

/// A training batch: inputs `[b, cond_len + n - 1]` and image targets `[b * n]`.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Token rows fed to the GPT.
    pub inputs: Tensor<2, Int>,
    /// Image codes to predict, in sequence order.
    pub targets: Tensor<1, Int>,
}

impl TokenLayout {
    /// The layout of a checked config.
    pub fn new(config: TransformerConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let perm = Permutation::new(config.permuter, config.window).map_err(|reason| {
            ModelError::Config {
                key: "permuter".into(),
                reason,
            }
        })?;
        Ok(Self { config, perm })
    }

    /// The config.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Turns token dropout off (evaluation).
    pub fn disable_token_dropout(&mut self) {
        self.config.pkeep = 1.0;
    }

    /// The window's token order.
    pub fn permutation(&self) -> &Permutation {
        &self.perm
    }

    /// Embedding rows of a condition; errors say what does not fit the model.
    pub fn cond_rows(&self, cond: &Cond) -> Result<Vec<i64>, ModelError> {
        let offset = self.config.cond_offset() as i64;
        let bad = |reason: String| ModelError::Config {
            key: "cond".into(),
            reason,
        };
        match (&self.config.cond, cond) {
            (Conditioning::None { sos_token }, Cond::None) => Ok(vec![offset + *sos_token as i64]),
            (Conditioning::Class { n_classes }, Cond::Class(c)) => {
                if !(0..*n_classes as i64).contains(c) {
                    return Err(bad(format!(
                        "class {c} is outside the model's {n_classes} classes"
                    )));
                }
                Ok(vec![offset + c])
            }
            (Conditioning::Segmentation { n_embed, .. }, Cond::Codes(codes)) => {
                let n = self.config.window_tokens();
                if codes.len() != n {
                    return Err(bad(format!(
                        "{} cond codes given, the window holds {n}",
                        codes.len()
                    )));
                }
                if let Some((i, c)) = codes
                    .iter()
                    .enumerate()
                    .find(|(_, c)| !(0..*n_embed as i64).contains(c))
                {
                    return Err(bad(format!(
                        "cond code {c} at {i} is outside the cond stage's {n_embed} codes"
                    )));
                }
                Ok(codes.iter().map(|c| offset + c).collect())
            }
            (expected, given) => Err(bad(format!(
                "the model is conditioned on `{}`, got {given:?}",
                expected.name()
            ))),
        }
    }

    /// Training inputs from image windows (raster codes) and cond rows; with `pkeep < 1`
    /// each image input token is replaced by a random code with probability `1 - pkeep`
    /// (targets stay the true codes).
    pub fn train_batch(
        &self,
        images: &[Vec<i64>],
        conds: &[Vec<i64>],
        rng: &mut StdRng,
        device: &Device,
    ) -> TrainBatch {
        let n = self.config.window_tokens();
        let cond_len = self.config.cond_len();
        let len = cond_len + n - 1;
        let mut inputs = Vec::with_capacity(images.len() * len);
        let mut targets = Vec::with_capacity(images.len() * n);
        for (image, cond) in images.iter().zip(conds) {
            let seq = self.perm.forward(image);
            inputs.extend_from_slice(cond);
            for &code in &seq[..n - 1] {
                let keep = self.config.pkeep >= 1.0 || rng.random::<f64>() < self.config.pkeep;
                inputs.push(if keep {
                    code
                } else {
                    rng.random_range(0..self.config.n_embed as i64)
                });
            }
            targets.extend(seq);
        }
        let b = images.len();
        TrainBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [b, len]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b * n]), device),
        }
    }

    /// Mean cross-entropy of the image positions.
    pub fn loss(&self, gpt: &Gpt, batch: TrainBatch) -> Tensor<1> {
        let logits = gpt.forward(batch.inputs);
        let [b, _, v] = logits.dims();
        let n = self.config.window_tokens();
        let image = logits.narrow(1, self.config.cond_len() - 1, n);
        let logp = log_softmax(image.reshape([b * n, v]), 1);
        let picked = logp.gather(1, batch.targets.reshape([b * n, 1]));
        picked.mean().neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::config::GptConfig;
    use rand::SeedableRng;

    #[test]
    fn pkeep_replaces_input_tokens_but_never_targets() {
        let gpt = GptConfig {
            vocab_size: 0,
            block_size: 0,
            n_layer: 1,
            n_head: 1,
            n_embd: 8,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attn_pdrop: 0.0,
        };
        let mut config =
            TransformerConfig::sized(gpt, 512, [16, 16], Conditioning::Class { n_classes: 3 });
        config.pkeep = 0.7;
        let layout = TokenLayout::new(config).unwrap();
        let images: Vec<Vec<i64>> = (0..20)
            .map(|i| (0..256).map(|t| (i + t) % 512).collect())
            .collect();
        let conds = vec![vec![512 + 1]; 20];
        let mut rng = StdRng::seed_from_u64(0);
        let device = Device::flex();
        let batch = layout.train_batch(&images, &conds, &mut rng, &device);
        let inputs: Vec<i64> = batch.inputs.try_into_vec_as::<i64>().unwrap();
        let targets: Vec<i64> = batch.targets.try_into_vec_as::<i64>().unwrap();
        assert_eq!(targets, images.concat(), "targets are the true codes");
        let mut changed = 0;
        for (row, image) in inputs.chunks(256).zip(&images) {
            assert_eq!(row[0], 513, "the cond token is never dropped");
            changed += row[1..].iter().zip(image).filter(|(a, b)| a != b).count();
            assert!(row[1..].iter().all(|&c| (0..512).contains(&c)));
        }
        let share = changed as f64 / (20.0 * 255.0);
        assert!((0.25..0.35).contains(&share), "{share}");
    }
}
