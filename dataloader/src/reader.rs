//! The sample stream of one rank: each epoch the shard list is shuffled by (seed, epoch),
//! split disjointly across ranks (shard i of the epoch's order goes to rank i mod world) and
//! across read slots inside the rank (interleaved round-robin), and a buffer shuffles the
//! samples. The position is a small [`LoaderState`]: resuming from it continues the same
//! sequence, delivering exactly the samples not yet delivered.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use webdataset::Sample;
use webdataset::shard::{TarFiles, group_by_keys};

use crate::error::DataError;
use crate::source::Location;
use crate::stream::{DEFAULT_PREFETCH, ObjectReader};
use crate::tar_bound::{EntryBound, MAX_ENTRY_BYTES};

/// How a rank reads its share of the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderConfig {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks sharing the data.
    pub world_size: usize,
    /// Shards read at once, interleaved sample by sample.
    pub read_slots: usize,
    /// Samples held by the shuffle buffer; 0 delivers samples in read order.
    pub shuffle_buffer: usize,
    /// Shuffle the shard order each epoch.
    pub shuffle_shards: bool,
    /// Seed of the shard order, the buffer draws and the augmentations.
    pub seed: u64,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            read_slots: 1,
            shuffle_buffer: 0,
            shuffle_shards: true,
            seed: 0,
        }
    }
}

/// Where a read slot stands: which of its shards, and how many samples of it were read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// Index into the slot's shard list for the epoch.
    pub position: usize,
    /// Samples of that shard read so far.
    pub offset: u64,
}

/// A reader's position: epoch, per-slot shard offsets, and the samples waiting in the
/// shuffle buffer as (shard, index) pairs. Serializable; a trainer checkpoints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch.
    pub epoch: u64,
    /// Samples drawn from the buffer this epoch (usable or not).
    pub delivered: u64,
    /// The read slot that supplies the next sample.
    pub next_slot: usize,
    /// One per read slot; empty at the start of an epoch.
    pub slots: Vec<SlotState>,
    /// Samples read but not delivered (shard id, index in shard), in buffer order.
    pub pending: Vec<(usize, u64)>,
}

/// A sample as read from its shard, not decoded.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// Index of its shard in the full shard list.
    pub shard: usize,
    /// Its index inside the shard.
    pub index: u64,
    /// Its files by extension.
    pub sample: Sample,
}

type Samples = Box<dyn Iterator<Item = Result<Sample, webdataset::Error>> + Send>;

struct Slot {
    shards: Vec<usize>,
    state: SlotState,
    cursor: Option<Samples>,
}

/// Reads the samples of one rank, epoch by epoch.
pub struct SampleReader {
    shards: Vec<Location>,
    cfg: ReaderConfig,
    epoch: u64,
    delivered: u64,
    next_slot: usize,
    slots: Vec<Slot>,
    buffer: Vec<RawSample>,
    bad_shards: u64,
}

impl SampleReader {
    /// A reader over `shards` for `cfg.rank`, positioned at `state`.
    pub fn new(
        shards: Vec<Location>,
        cfg: ReaderConfig,
        state: &LoaderState,
    ) -> Result<Self, DataError> {
        validate(&cfg, shards.len(), state)?;
        let mut reader = Self {
            shards,
            cfg,
            epoch: state.epoch,
            delivered: state.delivered,
            next_slot: state.next_slot,
            slots: Vec::new(),
            buffer: Vec::new(),
            bad_shards: 0,
        };
        reader.plan_epoch(&state.slots);
        reader.buffer = reader.refetch(&state.pending)?;
        Ok(reader)
    }

    /// The shard ids this rank reads in `epoch`, in order.
    pub fn rank_shards(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        if self.cfg.shuffle_shards {
            order.shuffle(&mut StdRng::seed_from_u64(mix(&[
                self.cfg.seed,
                epoch,
                u64::MAX,
                0,
            ])));
        }
        order
            .into_iter()
            .skip(self.cfg.rank)
            .step_by(self.cfg.world_size)
            .collect()
    }

    /// The current position.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.epoch,
            delivered: self.delivered,
            next_slot: self.next_slot,
            slots: self.slots.iter().map(|s| s.state).collect(),
            pending: self.buffer.iter().map(|s| (s.shard, s.index)).collect(),
        }
    }

    /// Shards abandoned because they were corrupt or truncated.
    pub fn bad_shards(&self) -> u64 {
        self.bad_shards
    }

    /// The URL of shard `id`.
    pub fn shard_url(&self, id: usize) -> &str {
        &self.shards[id].url
    }

    /// The seed this reader was configured with.
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves to the start of the next epoch.
    pub fn next_epoch(&mut self) {
        self.epoch += 1;
        self.delivered = 0;
        self.next_slot = 0;
        self.buffer.clear();
        self.plan_epoch(&[]);
    }

    /// The next sample of the epoch; `None` when the epoch is over.
    pub fn next_raw(&mut self) -> Result<Option<RawSample>, DataError> {
        if self.cfg.shuffle_buffer == 0 {
            let sample = self.read_next()?;
            self.delivered += sample.is_some() as u64;
            return Ok(sample);
        }
        while self.buffer.len() < self.cfg.shuffle_buffer {
            match self.read_next()? {
                Some(sample) => self.buffer.push(sample),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let draw = StdRng::seed_from_u64(mix(&[
            self.cfg.seed,
            self.epoch,
            self.cfg.rank as u64,
            self.delivered,
        ]))
        .random_range(0..self.buffer.len());
        self.delivered += 1;
        Ok(Some(self.buffer.swap_remove(draw)))
    }

    fn plan_epoch(&mut self, saved: &[SlotState]) {
        let mine = self.rank_shards(self.epoch);
        let n = self.cfg.read_slots;
        self.slots = (0..n)
            .map(|w| Slot {
                shards: mine.iter().skip(w).step_by(n).copied().collect(),
                state: saved.get(w).copied().unwrap_or_default(),
                cursor: None,
            })
            .collect();
    }

    /// The next sample in round-robin order over the slots.
    fn read_next(&mut self) -> Result<Option<RawSample>, DataError> {
        for _ in 0..self.slots.len() {
            let w = self.next_slot;
            self.next_slot = (w + 1) % self.slots.len();
            if let Some(sample) = self.read_slot(w)? {
                return Ok(Some(sample));
            }
        }
        Ok(None)
    }

    fn read_slot(&mut self, w: usize) -> Result<Option<RawSample>, DataError> {
        loop {
            let slot = &self.slots[w];
            let Some(&shard) = slot.shards.get(slot.state.position) else {
                return Ok(None);
            };
            if slot.cursor.is_none() {
                let cursor = open_samples(&self.shards[shard], slot.state.offset)?;
                self.slots[w].cursor = Some(cursor);
            }
            let slot = &mut self.slots[w];
            match slot.cursor.as_mut().expect("opened").next() {
                Some(Ok(sample)) => {
                    let index = slot.state.offset;
                    slot.state.offset += 1;
                    return Ok(Some(RawSample {
                        shard,
                        index,
                        sample,
                    }));
                }
                Some(Err(e)) => {
                    self.bad_shards += 1;
                    tracing::warn!(shard = %self.shards[shard].url, after = slot.state.offset,
                        "abandoning the rest of a corrupt shard: {e}");
                    advance(slot);
                }
                None => advance(slot),
            }
        }
    }

    /// Reads the samples listed in `pending` again (after a resume), in that order.
    fn refetch(&self, pending: &[(usize, u64)]) -> Result<Vec<RawSample>, DataError> {
        let mut wanted: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &(shard, index) in pending {
            wanted.entry(shard).or_default().push(index);
        }
        let mut found: HashMap<(usize, u64), Sample> = HashMap::new();
        for (shard, mut indices) in wanted {
            indices.sort_unstable();
            let first = indices[0];
            let last = *indices.last().expect("non-empty");
            let samples = open_samples(&self.shards[shard], first)?;
            for (i, item) in samples.take((last - first + 1) as usize).enumerate() {
                let index = first + i as u64;
                let sample = item.map_err(|e| DataError::Shard {
                    shard: self.shards[shard].url.clone().into(),
                    reason: format!("re-reading sample {index} on resume: {e}"),
                })?;
                if indices.binary_search(&index).is_ok() {
                    found.insert((shard, index), sample);
                }
            }
        }
        pending
            .iter()
            .map(|&(shard, index)| {
                let sample = found
                    .remove(&(shard, index))
                    .ok_or_else(|| DataError::State {
                        reason: format!(
                            "resume state names sample {index} of {}, which does not exist",
                            self.shards[shard].url
                        ),
                    })?;
                Ok(RawSample {
                    shard,
                    index,
                    sample,
                })
            })
            .collect()
    }
}

fn advance(slot: &mut Slot) {
    slot.cursor = None;
    slot.state.position += 1;
    slot.state.offset = 0;
}

fn validate(cfg: &ReaderConfig, shards: usize, state: &LoaderState) -> Result<(), DataError> {
    let bad = |reason: String| Err(DataError::State { reason });
    if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
        return bad(format!(
            "rank {} is not below world size {}",
            cfg.rank, cfg.world_size
        ));
    }
    if cfg.read_slots == 0 {
        return bad("read_slots must be at least 1".into());
    }
    if shards < cfg.world_size {
        return bad(format!(
            "{shards} shard(s) cannot be split across {} ranks: each rank needs at least one",
            cfg.world_size
        ));
    }
    if !state.slots.is_empty() && state.slots.len() != cfg.read_slots {
        return bad(format!(
            "resume state has {} read slots, the reader {}",
            state.slots.len(),
            cfg.read_slots
        ));
    }
    if state.next_slot >= cfg.read_slots {
        return bad(format!(
            "resume state's next_slot {} is out of range",
            state.next_slot
        ));
    }
    if let Some(&(shard, _)) = state.pending.iter().find(|(s, _)| *s >= shards) {
        return bad(format!(
            "resume state names shard {shard}; there are {shards}"
        ));
    }
    Ok(())
}

/// The grouped samples of a shard, from sample `skip` on.
pub(crate) fn open_samples(loc: &Location, skip: u64) -> Result<Samples, DataError> {
    let reader = ObjectReader::open(loc, 0, DEFAULT_PREFETCH)?;
    let bounded = EntryBound::new(reader, MAX_ENTRY_BYTES);
    let files = TarFiles::new(Box::new(bounded)).map_err(|e| DataError::Shard {
        shard: loc.url.clone().into(),
        reason: e.to_string(),
    })?;
    Ok(Box::new(group_by_keys(files).skip(skip as usize)))
}

/// A seed from several words (splitmix64 steps).
pub(crate) fn mix(words: &[u64]) -> u64 {
    let step = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    words.iter().fold(0, |acc, &w| step(acc ^ w))
}
