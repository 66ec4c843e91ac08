//! Stage-2 training data: token grids with their labels and cond codes, read from the code
//! Parquet of `dataloader precompute-codes` (a file, or a directory with `_manifest.json`),
//! or encoded on the fly from image shards through the frozen VQGAN. Rows are checked
//! against the model before training; a sampler deals this rank's rows in a per-epoch
//! shuffled order and crops random windows from grids larger than the training window.

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use taming_dataloader::codes::{self, CodeRow};
use taming_dataloader::{DataError, ImageBatch};
use taming_model::Vqgan;
use taming_model::quantize::QuantizeMode;
use taming_model::transformer::{Cond, Conditioning, TokenLayout, TransformerConfig};

/// One image's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSample {
    /// Codes, raster order.
    pub codes: Vec<i64>,
    /// Grid `[h, w]`.
    pub grid: [usize; 2],
    /// Class label.
    pub label: Option<i64>,
    /// Cond-stage codes on the same grid.
    pub cond: Option<Vec<i64>>,
}

fn bad(source: &str, reason: String) -> DataError {
    DataError::Shard {
        shard: source.into(),
        reason,
    }
}

impl CodeSample {
    fn from_row(row: CodeRow, source: &str) -> Result<Self, DataError> {
        let (h, w) = (row.height, row.width);
        if h <= 0 || w <= 0 || (h * w) as usize != row.codes.len() {
            return Err(bad(
                source,
                format!(
                    "row `{}`: `codes` holds {} values for a {h}x{w} grid",
                    row.key,
                    row.codes.len()
                ),
            ));
        }
        Ok(Self {
            codes: row.codes.into_iter().map(i64::from).collect(),
            grid: [h as usize, w as usize],
            label: row.label,
            cond: row
                .cond_codes
                .map(|c| c.into_iter().map(i64::from).collect()),
        })
    }

    /// The `[r0, c0]`-placed window of `[wh, ww]` tokens and its cond rows.
    fn window(&self, [r0, c0]: [usize; 2], [wh, ww]: [usize; 2]) -> (Vec<i64>, Option<Vec<i64>>) {
        let w = self.grid[1];
        let patch = |src: &[i64]| -> Vec<i64> {
            (r0..r0 + wh)
                .flat_map(|r| src[r * w + c0..r * w + c0 + ww].iter().copied())
                .collect()
        };
        (patch(&self.codes), self.cond.as_deref().map(patch))
    }
}

/// Reads code Parquet: a `.parquet` file, or a directory (path or URL) with `_manifest.json`.
pub fn read_code_set(url: &str) -> Result<Vec<CodeSample>, DataError> {
    let files = if url.ends_with(".parquet") {
        vec![url.to_string()]
    } else {
        let manifest = codes::read_manifest(url)?;
        manifest
            .files
            .iter()
            .map(|f| codes::join(url, &f.path))
            .collect()
    };
    let mut out = Vec::new();
    for file in files {
        for row in codes::read_codes(&file)? {
            out.push(CodeSample::from_row(row, &file)?);
        }
    }
    if out.is_empty() {
        return Err(bad(url, "holds no rows".into()));
    }
    Ok(out)
}

/// Checks every sample against the model: codes inside the codebook, grids at least the
/// window, and the label or cond codes the conditioning needs, inside their ranges.
pub fn check_samples(
    samples: &[CodeSample],
    config: &TransformerConfig,
    source: &str,
) -> Result<(), DataError> {
    let [wh, ww] = config.window;
    for (i, s) in samples.iter().enumerate() {
        let at = |reason: String| bad(source, format!("row {i}: {reason}"));
        if let Some(c) = s
            .codes
            .iter()
            .find(|&&c| !(0..config.n_embed as i64).contains(&c))
        {
            return Err(at(format!(
                "code {c} is outside the VQGAN's {} codes (`codes`)",
                config.n_embed
            )));
        }
        if s.grid[0] < wh || s.grid[1] < ww {
            return Err(at(format!(
                "a {}x{} grid is smaller than the {wh}x{ww} window",
                s.grid[0], s.grid[1]
            )));
        }
        match &config.cond {
            Conditioning::Class { n_classes } => match s.label {
                Some(l) if (0..*n_classes as i64).contains(&l) => {}
                Some(l) => return Err(at(format!("`label` {l} is outside 0..{n_classes}"))),
                None => return Err(at("`label` is empty (class conditioning)".into())),
            },
            Conditioning::Segmentation { n_embed, .. } => match &s.cond {
                Some(c) if c.len() != s.codes.len() => {
                    return Err(at(format!(
                        "`cond_codes` holds {} values, `codes` {}",
                        c.len(),
                        s.codes.len()
                    )));
                }
                Some(c) => {
                    if let Some(v) = c.iter().find(|&&v| !(0..*n_embed as i64).contains(&v)) {
                        return Err(at(format!(
                            "cond code {v} is outside the cond stage's {n_embed} codes"
                        )));
                    }
                }
                None => {
                    return Err(at(
                        "`cond_codes` is empty (segmentation conditioning)".into()
                    ));
                }
            },
            Conditioning::None { .. } => {}
        }
    }
    Ok(())
}

/// Where a [`CodeSampler`] stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodePosition {
    /// Epoch.
    pub epoch: u64,
    /// Samples of this epoch already dealt.
    pub next: usize,
}

/// Deals this rank's samples in a shuffled order per epoch.
pub struct CodeSampler {
    samples: Vec<CodeSample>,
    seed: u64,
    position: CodePosition,
    order: Vec<usize>,
}

impl CodeSampler {
    /// Rank `rank` of `world` takes samples `rank, rank + world, ...`.
    pub fn new(
        samples: Vec<CodeSample>,
        rank: usize,
        world: usize,
        seed: u64,
        position: CodePosition,
    ) -> Self {
        let mine: Vec<CodeSample> = samples
            .into_iter()
            .skip(rank)
            .step_by(world.max(1))
            .collect();
        let mut s = Self {
            samples: mine,
            seed,
            position,
            order: Vec::new(),
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        self.order = (0..self.samples.len()).collect();
        let mut rng = StdRng::seed_from_u64(self.seed ^ self.position.epoch.wrapping_mul(0x9E37));
        self.order.shuffle(&mut rng);
    }

    /// The next `n` samples (crossing into the next epoch when this one runs out).
    pub fn next_batch(&mut self, n: usize) -> Vec<CodeSample> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !self.samples.is_empty() {
            if self.position.next >= self.order.len() {
                self.position.epoch += 1;
                self.position.next = 0;
                self.shuffle();
            }
            out.push(self.samples[self.order[self.position.next]].clone());
            self.position.next += 1;
        }
        out
    }

    /// The position after the last batch dealt.
    pub fn position(&self) -> CodePosition {
        self.position.clone()
    }
}

/// Image windows (raster codes) and the cond rows of each.
pub type Windows = (Vec<Vec<i64>>, Vec<Vec<i64>>);

/// Image windows and cond rows of a batch: a random window placement per sample (the whole
/// grid when it is the window's size).
pub fn windows(
    layout: &TokenLayout,
    batch: &[CodeSample],
    rng: &mut StdRng,
) -> Result<Windows, taming_model::ModelError> {
    let [wh, ww] = layout.config().window;
    let mut images = Vec::with_capacity(batch.len());
    let mut conds = Vec::with_capacity(batch.len());
    for s in batch {
        let r0 = rng.random_range(0..=s.grid[0] - wh);
        let c0 = rng.random_range(0..=s.grid[1] - ww);
        let (codes, cond_codes) = s.window([r0, c0], [wh, ww]);
        let cond = match (&layout.config().cond, s.label, cond_codes) {
            (Conditioning::Class { .. }, Some(l), _) => Cond::Class(l),
            (Conditioning::Segmentation { .. }, _, Some(c)) => Cond::Codes(c),
            _ => Cond::None,
        };
        conds.push(layout.cond_rows(&cond)?);
        images.push(codes);
    }
    Ok((images, conds))
}

/// Encodes an image batch with a frozen VQGAN (non-autodiff `device`) into code samples.
pub fn encode_batch(vqgan: &Vqgan, batch: &ImageBatch, device: &Device) -> Vec<CodeSample> {
    let x: Tensor<4> =
        Tensor::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
    let q = vqgan.encode(x, QuantizeMode::EVAL).indices;
    let [b, h, w] = q.dims();
    let flat = q.try_into_vec_as::<i64>().expect("int indices");
    (0..b)
        .map(|i| CodeSample {
            codes: flat[i * h * w..(i + 1) * h * w].to_vec(),
            grid: [h, w],
            label: batch.labels.get(i).copied().flatten(),
            cond: None,
        })
        .collect()
}
