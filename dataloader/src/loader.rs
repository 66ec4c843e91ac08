//! Batches for trainers: samples from a [`SampleReader`], decoded and augmented in parallel
//! (rayon), each with its own random stream seeded by (seed, epoch, shard, index) so that a
//! resumed run sees the same augmentations. Unusable samples are skipped with a counter and
//! a warning naming shard and key.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::error::DataError;
use crate::reader::{LoaderState, RawSample, ReaderConfig, SampleReader, mix};
use crate::sample;
use crate::source::{Location, locate};
use crate::transform::{Channel, Preprocess, normalize};

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Decoding and augmentation.
    pub preprocess: Preprocess,
    /// Rank split, read slots, shuffling and seed.
    pub reader: ReaderConfig,
    /// Skip (with a count and a warning) samples without a label map: for consumers that
    /// need one per sample. Otherwise a batch has label maps only when all its samples do.
    pub require_masks: bool,
}

impl LoaderConfig {
    /// One rank, one read slot, shards shuffled per epoch when `train`, no sample buffer.
    pub fn simple(batch_size: usize, preprocess: Preprocess, seed: u64, train: bool) -> Self {
        Self {
            batch_size,
            preprocess,
            reader: ReaderConfig {
                shuffle_shards: train,
                seed,
                ..ReaderConfig::default()
            },
            require_masks: false,
        }
    }
}

/// A batch of images `[b, 3, size, size]` with label maps, labels and keys: bytes as decoded
/// ([`PixelBatch`]) or floats in [-1, 1] ([`ImageBatch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<T> {
    /// CHW images, concatenated.
    pub images: Vec<T>,
    /// `[b, 3, size, size]`.
    pub shape: [usize; 4],
    /// `[b, size, size]` label maps when every sample had one.
    pub masks: Option<Vec<u8>>,
    /// Class labels, when present.
    pub labels: Vec<Option<i64>>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// The shard each sample came from.
    pub sources: Vec<String>,
    /// The loader's position after this batch.
    pub state: LoaderState,
}

/// Decoded pixels (bytes), as the loader makes them and the service can send them.
pub type PixelBatch = Batch<u8>;

/// Model inputs: pixels as x / 127.5 - 1.
pub type ImageBatch = Batch<f32>;

impl From<PixelBatch> for ImageBatch {
    fn from(b: PixelBatch) -> Self {
        let images = normalize(&b.images);
        b.with_images(images)
    }
}

impl<T> Batch<T> {
    /// The same batch with other image data.
    fn with_images<U>(self, images: Vec<U>) -> Batch<U> {
        Batch {
            images,
            shape: self.shape,
            masks: self.masks,
            labels: self.labels,
            keys: self.keys,
            sources: self.sources,
            state: self.state,
        }
    }
}

/// Anything that hands out batches and can say where it stands: the local loader and the
/// dataloader-service client.
pub trait BatchSource: Send {
    /// The next batch, wrapping into the next epoch as needed.
    fn next_batch(&mut self) -> Result<ImageBatch, DataError>;
    /// The position after the last batch.
    fn state(&self) -> LoaderState;
    /// Samples skipped as unusable so far.
    fn skipped(&self) -> u64;
}

/// What a decoded sample brings besides its image, which went straight into the batch.
struct Decoded {
    key: String,
    shard: usize,
    mask: Option<Vec<u8>>,
    label: Option<i64>,
}

/// Reads batches from shards, epoch after epoch.
pub struct ShardLoader {
    reader: SampleReader,
    cfg: LoaderConfig,
    skipped: u64,
    usable_this_epoch: bool,
}

impl ShardLoader {
    /// A loader over shard URLs or paths, starting at `state`.
    pub fn open(
        shards: &[String],
        cfg: LoaderConfig,
        state: &LoaderState,
    ) -> Result<Self, DataError> {
        let locations = shards
            .iter()
            .map(|s| locate(s))
            .collect::<Result<Vec<Location>, _>>()?;
        Self::new(locations, cfg, state)
    }

    /// A loader over located shards, starting at `state`.
    pub fn new(
        shards: Vec<Location>,
        cfg: LoaderConfig,
        state: &LoaderState,
    ) -> Result<Self, DataError> {
        let started = state.delivered > 0 || !state.pending.is_empty();
        Ok(Self {
            reader: SampleReader::new(shards, cfg.reader, state)?,
            cfg,
            skipped: 0,
            usable_this_epoch: started,
        })
    }

    /// Samples skipped so far because they were unusable.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Shards abandoned as corrupt or truncated.
    pub fn bad_shards(&self) -> u64 {
        self.reader.bad_shards()
    }

    /// The position after the last delivered batch.
    pub fn state(&self) -> LoaderState {
        self.reader.state()
    }

    /// The next batch, moving on to the next epoch when one ends.
    pub fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        self.next_wrapping()
    }

    /// The next batch as bytes, moving on to the next epoch when one ends.
    pub fn next_pixels(&mut self) -> Result<PixelBatch, DataError> {
        self.next_wrapping()
    }

    /// The next batch of the current epoch (the last one may be short), `None` at its end.
    pub fn next_in_epoch(&mut self) -> Result<Option<ImageBatch>, DataError> {
        self.collect(false)
    }

    /// Like [`Self::next_in_epoch`], as bytes.
    pub fn next_pixels_in_epoch(&mut self) -> Result<Option<PixelBatch>, DataError> {
        self.collect(false)
    }

    fn next_wrapping<T: Channel>(&mut self) -> Result<Batch<T>, DataError> {
        self.collect(true)?.ok_or(DataError::Empty {
            skipped: self.skipped,
        })
    }

    /// Decodes samples straight into the batch's image buffer until it is full (or, without
    /// `wrap`, the epoch ends).
    fn collect<T: Channel>(&mut self, wrap: bool) -> Result<Option<Batch<T>>, DataError> {
        let len = self.cfg.preprocess.image_len();
        let mut images = vec![T::default(); self.cfg.batch_size * len];
        let mut done: Vec<Decoded> = Vec::with_capacity(self.cfg.batch_size);
        while done.len() < self.cfg.batch_size {
            let raws = self.draw(self.cfg.batch_size - done.len())?;
            if raws.is_empty() {
                if !wrap {
                    break;
                }
                self.next_epoch()?;
                continue;
            }
            let slots = &mut images[done.len() * len..(done.len() + raws.len()) * len];
            let decoded = self.decode_all(raws, slots);
            self.usable_this_epoch |= !decoded.is_empty();
            done.extend(decoded);
        }
        images.truncate(done.len() * len);
        Ok((!done.is_empty()).then(|| self.assemble(done, images)))
    }

    fn draw(&mut self, n: usize) -> Result<Vec<RawSample>, DataError> {
        let mut raws = Vec::with_capacity(n);
        while raws.len() < n {
            match self.reader.next_raw()? {
                Some(raw) => raws.push(raw),
                None => break,
            }
        }
        Ok(raws)
    }

    fn next_epoch(&mut self) -> Result<(), DataError> {
        if !self.usable_this_epoch {
            return Err(DataError::Empty {
                skipped: self.skipped,
            });
        }
        self.reader.next_epoch();
        self.usable_this_epoch = false;
        Ok(())
    }

    /// Decodes `raws` in parallel, each into its slot of `slots`; the images of the usable
    /// ones end up at the front, in order.
    fn decode_all<T: Channel>(&mut self, raws: Vec<RawSample>, slots: &mut [T]) -> Vec<Decoded> {
        let (cfg, seed, epoch) = (self.cfg, self.reader.seed(), self.reader.epoch());
        let len = cfg.preprocess.image_len();
        let results: Vec<Result<Decoded, String>> = raws
            .par_iter()
            .zip(slots.par_chunks_mut(len))
            .map(|(raw, slot)| decode(raw, &cfg, (seed, epoch), slot))
            .collect();
        let mut out = Vec::with_capacity(results.len());
        for (i, (raw, result)) in raws.iter().zip(results).enumerate() {
            match result {
                Ok(d) => {
                    let kept = out.len();
                    if kept != i {
                        slots.copy_within(i * len..(i + 1) * len, kept * len);
                    }
                    out.push(d);
                }
                Err(why) => {
                    self.skipped += 1;
                    let key = raw.sample.key().unwrap_or("?");
                    let shard = self.reader.shard_url(raw.shard);
                    tracing::warn!(shard, key, "skipping sample: {why}");
                }
            }
        }
        out
    }

    fn assemble<T>(&self, done: Vec<Decoded>, images: Vec<T>) -> Batch<T> {
        let size = self.cfg.preprocess.size;
        let all_masks = done.iter().all(|d| d.mask.is_some());
        let mut batch = Batch {
            images,
            shape: [done.len(), 3, size, size],
            masks: all_masks.then(Vec::new),
            labels: Vec::with_capacity(done.len()),
            keys: Vec::with_capacity(done.len()),
            sources: Vec::with_capacity(done.len()),
            state: self.reader.state(),
        };
        for d in done {
            if let (Some(masks), Some(m)) = (batch.masks.as_mut(), d.mask) {
                masks.extend(m);
            }
            batch.labels.push(d.label);
            batch.keys.push(d.key);
            batch
                .sources
                .push(self.reader.shard_url(d.shard).to_string());
        }
        batch
    }
}

impl BatchSource for ShardLoader {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        ShardLoader::next_batch(self)
    }

    fn state(&self) -> LoaderState {
        ShardLoader::state(self)
    }

    fn skipped(&self) -> u64 {
        ShardLoader::skipped(self)
    }
}

/// Decodes one sample's image into `slot`, with the random stream of (seed, epoch, shard,
/// index).
fn decode<T: Channel>(
    raw: &RawSample,
    cfg: &LoaderConfig,
    (seed, epoch): (u64, u64),
    slot: &mut [T],
) -> Result<Decoded, String> {
    let s = &raw.sample;
    let key = sample::safe_key(s)?.to_string();
    let image = sample::image_bytes(s).ok_or("no image (.png, .jpg, .jpeg or .webp)")?;
    let mask = sample::mask_bytes(s);
    if cfg.require_masks && mask.is_none() {
        return Err("no label map (.seg.png, .mask.png or .label.png)".into());
    }
    let mut rng = StdRng::seed_from_u64(mix(&[seed, epoch, raw.shard as u64, raw.index]));
    let mask = cfg.preprocess.apply_into(image, mask, &mut rng, slot)?;
    Ok(Decoded {
        key,
        shard: raw.shard,
        mask,
        label: sample::label(s),
    })
}
