//! Images from a trained transformer and its VQGAN(s): conditions turned into cond tokens
//! (a class, nothing, or a segmentation map encoded by the cond-stage VQGAN), codes sampled
//! (the KV-cached window sampler when the grid is the training window, the sliding window
//! otherwise) and decoded to pictures.

use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;

use crate::config::VqganConfig;
use crate::error::ModelError;
use crate::image_io::{one_hot, to_image};
use crate::quantize::QuantizeMode;
use crate::transformer::{
    Cond, Conditioning, Gpt, GridCond, Sampling, TokenLayout, WindowMode, sample_grid,
    sample_window,
};
use crate::vqgan::Vqgan;

/// What to condition on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SynthCond {
    /// Nothing (unconditional models).
    None,
    /// A class label.
    Class(i64),
    /// A label map of `size` pixels, row-major, and where it came from (for errors).
    Map {
        /// Labels, one per pixel.
        labels: Vec<u8>,
        /// `[height, width]` in pixels.
        size: [usize; 2],
        /// File name for error messages.
        source: String,
    },
}

/// The models that make images.
pub struct Synthesizer<'a> {
    /// The transformer.
    pub gpt: &'a Gpt,
    /// Its token layout.
    pub layout: &'a TokenLayout,
    /// The first stage and its config.
    pub vqgan: (&'a VqganConfig, &'a Vqgan),
    /// The cond stage (segmentation conditioning).
    pub cond_vqgan: Option<(&'a VqganConfig, &'a Vqgan)>,
    /// Device of all three (not autodiff).
    pub device: Device,
}

fn config_error(key: &str, reason: String) -> ModelError {
    ModelError::Config {
        key: key.into(),
        reason,
    }
}

impl Synthesizer<'_> {
    /// Checks that the VQGANs fit the transformer.
    pub fn check(&self) -> Result<(), ModelError> {
        let config = self.layout.config();
        if self.vqgan.0.n_embed != config.n_embed {
            return Err(config_error(
                "vqgan",
                format!(
                    "has {} codes, the transformer was trained on {}",
                    self.vqgan.0.n_embed, config.n_embed
                ),
            ));
        }
        match (&config.cond, self.cond_vqgan) {
            (Conditioning::Segmentation { n_embed, classes }, Some((c, _))) => {
                if c.n_embed != *n_embed || c.ddconfig.in_channels != *classes {
                    return Err(config_error(
                        "cond_vqgan",
                        format!(
                            "has {} codes and {} input classes, the transformer needs {n_embed} and {classes}",
                            c.n_embed, c.ddconfig.in_channels
                        ),
                    ));
                }
                Ok(())
            }
            (Conditioning::Segmentation { .. }, None) => Err(config_error(
                "cond_vqgan",
                "a segmentation-conditioned transformer needs its cond-stage VQGAN".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Pixels per token.
    pub fn factor(&self) -> usize {
        self.vqgan.0.ddconfig.downsample_factor()
    }

    /// The cond tokens for a grid of `grid` tokens.
    pub fn grid_cond(&self, cond: &SynthCond, grid: [usize; 2]) -> Result<GridCond, ModelError> {
        let layout = self.layout;
        match cond {
            SynthCond::None => Ok(GridCond::Fixed(layout.cond_rows(&Cond::None)?)),
            SynthCond::Class(c) => Ok(GridCond::Fixed(layout.cond_rows(&Cond::Class(*c))?)),
            SynthCond::Map {
                labels,
                size,
                source,
            } => {
                let Some((cfg, vq)) = self.cond_vqgan else {
                    return Err(config_error(
                        "segmentation",
                        "the transformer is not segmentation-conditioned".into(),
                    ));
                };
                let x = one_hot(
                    labels,
                    cfg.ddconfig.in_channels,
                    *size,
                    source,
                    &self.device,
                )?;
                let q = vq.encode(x, QuantizeMode::EVAL).indices;
                let [_, h, w] = q.dims();
                if [h, w] != grid {
                    return Err(ModelError::file(
                        source,
                        format!(
                            "encodes to {h}x{w} cond tokens, the grid is {}x{}",
                            grid[0], grid[1]
                        ),
                    ));
                }
                let offset = layout.config().cond_offset() as i64;
                let codes = q.try_into_vec_as::<i64>().expect("int indices");
                Ok(GridCond::Spatial(
                    codes.into_iter().map(|c| c + offset).collect(),
                ))
            }
        }
    }

    /// `n` code grids of `grid` tokens.
    pub fn sample_codes(
        &self,
        cond: &GridCond,
        grid: [usize; 2],
        n: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Vec<Vec<i64>>, ModelError> {
        if grid == self.layout.config().window {
            let rows = match cond {
                GridCond::Fixed(c) | GridCond::Spatial(c) => c.clone(),
            };
            return sample_window(self.gpt, self.layout, &vec![rows; n], sampling, seed, true);
        }
        (0..n as u64)
            .map(|i| {
                sample_grid(
                    self.gpt,
                    self.layout,
                    grid,
                    cond,
                    sampling,
                    seed.wrapping_add(i),
                    WindowMode::Reuse,
                )
            })
            .collect()
    }

    /// Decodes code grids of `grid` tokens to images.
    pub fn decode(&self, codes: &[Vec<i64>], [h, w]: [usize; 2]) -> Vec<RgbImage> {
        codes
            .iter()
            .map(|c| {
                let idx: Tensor<3, Int> =
                    Tensor::from_data(TensorData::new(c.clone(), [1, h, w]), &self.device);
                to_image(self.vqgan.1.decode_indices(idx))
            })
            .collect()
    }
}
