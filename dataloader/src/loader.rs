//! Batches from local shards, in an order fixed by (seed, epoch), with a position that can be
//! saved and resumed: resuming at a [`LoaderState`] delivers exactly the samples that had not
//! been delivered, with the same augmentations.

use std::fs::File;
use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use webdataset::Sample;
use webdataset::shard::{TarFiles, group_by_keys};

use crate::error::DataError;
use crate::transform::Preprocess;

/// Where a loader stands: epoch, index of the shard in that epoch's order, samples of that
/// shard already consumed (usable or not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch.
    pub epoch: u64,
    /// Index into the epoch's shard order.
    pub shard: usize,
    /// Samples of that shard consumed.
    pub offset: usize,
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Decoding and augmentation.
    pub preprocess: Preprocess,
    /// Seed of the shard order and the augmentations.
    pub seed: u64,
    /// Shuffle the shard order each epoch (training) or keep it (validation).
    pub shuffle_shards: bool,
}

/// A batch of images `[b, 3, size, size]` in [-1, 1], with labels and keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    /// CHW images, concatenated.
    pub images: Vec<f32>,
    /// `[b, 3, size, size]`.
    pub shape: [usize; 4],
    /// Class labels (from `.cls`), when present.
    pub labels: Vec<Option<i64>>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// The loader's position after this batch.
    pub state: LoaderState,
}

/// One decoded sample: key, CHW image, label.
type Decoded = (String, Vec<f32>, Option<i64>);

type Samples = Box<dyn Iterator<Item = Result<Sample, webdataset::Error>> + Send>;

struct Cursor {
    path: PathBuf,
    samples: Samples,
}

/// Reads batches from a list of shards, epoch after epoch.
pub struct ShardLoader {
    shards: Vec<PathBuf>,
    cfg: LoaderConfig,
    state: LoaderState,
    cursor: Option<Cursor>,
    skipped: u64,
    usable_this_epoch: bool,
}

const IMAGE_FIELDS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

impl ShardLoader {
    /// A loader over `shards` starting at `state`.
    pub fn new(shards: Vec<PathBuf>, cfg: LoaderConfig, state: LoaderState) -> Self {
        Self {
            shards,
            cfg,
            state,
            cursor: None,
            skipped: 0,
            usable_this_epoch: state.shard > 0 || state.offset > 0,
        }
    }

    /// Samples skipped so far because they had no decodable image.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The position after the last delivered sample.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// The shard order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        if self.cfg.shuffle_shards {
            order.shuffle(&mut StdRng::seed_from_u64(mix(
                self.cfg.seed,
                epoch,
                u64::MAX,
                0,
            )));
        }
        order
    }

    /// The next batch, moving on to the next epoch when one ends.
    pub fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        self.collect_batch(true)?.ok_or(DataError::Empty {
            shards: self.shards.len(),
            skipped: self.skipped,
        })
    }

    /// The next batch of the current epoch (the last one may be short), `None` at its end.
    pub fn next_in_epoch(&mut self) -> Result<Option<ImageBatch>, DataError> {
        self.collect_batch(false)
    }

    fn collect_batch(&mut self, wrap: bool) -> Result<Option<ImageBatch>, DataError> {
        let size = self.cfg.preprocess.size;
        let mut batch = ImageBatch {
            images: Vec::with_capacity(self.cfg.batch_size * 3 * size * size),
            shape: [0, 3, size, size],
            labels: Vec::new(),
            keys: Vec::new(),
            state: self.state,
        };
        while batch.keys.len() < self.cfg.batch_size {
            match self.next_sample()? {
                Some((key, image, label)) => {
                    batch.images.extend(image);
                    batch.labels.push(label);
                    batch.keys.push(key);
                }
                None if wrap => self.next_epoch()?,
                None => break,
            }
        }
        batch.shape[0] = batch.keys.len();
        batch.state = self.state;
        Ok((!batch.keys.is_empty()).then_some(batch))
    }

    fn next_epoch(&mut self) -> Result<(), DataError> {
        if !self.usable_this_epoch {
            return Err(DataError::Empty {
                shards: self.shards.len(),
                skipped: self.skipped,
            });
        }
        self.state = LoaderState {
            epoch: self.state.epoch + 1,
            shard: 0,
            offset: 0,
        };
        self.usable_this_epoch = false;
        Ok(())
    }

    /// The next usable sample of the epoch; `None` when the epoch is over.
    fn next_sample(&mut self) -> Result<Option<Decoded>, DataError> {
        loop {
            if self.state.shard >= self.shards.len() {
                return Ok(None);
            }
            if self.cursor.is_none() {
                self.cursor = Some(self.open()?);
            }
            let cursor = self.cursor.as_mut().expect("opened");
            let Some(item) = cursor.samples.next() else {
                self.cursor = None;
                self.state.shard += 1;
                self.state.offset = 0;
                continue;
            };
            let path = cursor.path.clone();
            let sample = item.map_err(|e| DataError::Shard {
                shard: path.clone(),
                reason: e.to_string(),
            })?;
            let index = self.state.offset;
            self.state.offset += 1;
            if let Some(usable) = self.decode(&path, index, &sample) {
                self.usable_this_epoch = true;
                return Ok(Some(usable));
            }
        }
    }

    fn open(&self) -> Result<Cursor, DataError> {
        let path = self.shards[self.order(self.state.epoch)[self.state.shard]].clone();
        let file = File::open(&path).map_err(|e| DataError::Shard {
            shard: path.clone(),
            reason: e.to_string(),
        })?;
        let files = TarFiles::new(Box::new(file)).map_err(|e| DataError::Shard {
            shard: path.clone(),
            reason: e.to_string(),
        })?;
        let samples: Samples = Box::new(group_by_keys(files).skip(self.state.offset));
        Ok(Cursor { path, samples })
    }

    fn decode(&mut self, path: &std::path::Path, index: usize, sample: &Sample) -> Option<Decoded> {
        let key = sample.key().unwrap_or("?").to_string();
        let shard_id = self.order(self.state.epoch)[self.state.shard] as u64;
        let mut rng =
            StdRng::seed_from_u64(mix(self.cfg.seed, self.state.epoch, shard_id, index as u64));
        let bytes = IMAGE_FIELDS
            .iter()
            .find_map(|f| sample.get(f).and_then(|v| v.as_bytes()));
        let result = match bytes {
            Some(bytes) => self.cfg.preprocess.apply(bytes, &mut rng),
            None => Err("no image (.png, .jpg, .jpeg or .webp)".to_string()),
        };
        match result {
            Ok(image) => Some((key, image, label(sample))),
            Err(why) => {
                self.skipped += 1;
                tracing::warn!(shard = %path.display(), key = %key, "skipping sample: {why}");
                None
            }
        }
    }
}

fn label(sample: &Sample) -> Option<i64> {
    let value = sample.get("cls")?;
    value.as_i64().or_else(|| {
        let bytes = value.as_bytes()?;
        std::str::from_utf8(bytes).ok()?.trim().parse().ok()
    })
}

/// A seed from (seed, epoch, shard, index) (splitmix64 steps).
fn mix(seed: u64, epoch: u64, shard: u64, index: u64) -> u64 {
    let step = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    step(step(step(step(seed) ^ epoch) ^ shard) ^ index)
}
