//! What every training run shares, whatever its stage: the run folder and its checkpoints,
//! how long it trains, how often it evaluates, and its place in a data-parallel job.

use std::path::PathBuf;

use burn::tensor::Device;
use taming_collective::AllReduce;
use taming_dataloader::{BatchSource, Prefetched};

/// Batches decoded ahead by default: enough to hide a slow batch behind a fast step.
pub const DEFAULT_PREFETCH: usize = 2;

/// The settings of a run that do not depend on its stage.
pub struct RunSettings {
    /// Run folder.
    pub out: PathBuf,
    /// Train until this many optimizer steps.
    pub steps: u64,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Object-store copy of the run's checkpoints (see [`crate::mirror`]); resuming pulls
    /// from it when the run folder lacks its latest checkpoint.
    pub checkpoint_url: Option<String>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Nodes (for the learning-rate scaling).
    pub nodes: usize,
    /// An autodiff device.
    pub device: Device,
    /// This rank (data split, who writes the run folder).
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// The data-parallel group (with `world > 1`).
    pub group: Option<Box<dyn AllReduce>>,
    /// Training batches made ahead on a background thread while a step runs (0: none):
    /// decoded from local shards, or received from the dataloader service and converted.
    pub prefetch: usize,
    /// The cluster job's attempt this run belongs to (0: none): checkpoints are fenced so
    /// that an older attempt stops writing once a newer one has claimed the run.
    pub attempt: u32,
}

impl RunSettings {
    /// A single-process run into `out` for `steps` steps on `device`: evaluation every 100
    /// steps, a checkpoint every 200, two kept, [`DEFAULT_PREFETCH`] batches decoded ahead.
    pub fn single(out: PathBuf, steps: u64, device: Device) -> Self {
        Self {
            out,
            steps,
            resume: false,
            checkpoint_url: None,
            eval_every: 100,
            checkpoint_every: 200,
            keep: 2,
            nodes: 1,
            device,
            rank: 0,
            world: 1,
            group: None,
            prefetch: DEFAULT_PREFETCH,
            attempt: 0,
        }
    }

    /// `source`, with [`Self::prefetch`] batches made ahead on a background thread.
    pub fn ahead(&self, source: Box<dyn BatchSource>) -> Box<dyn BatchSource> {
        ahead(source, self.prefetch)
    }

    /// What a stage keeps of these settings to open its data and model again.
    pub fn context(&self) -> RunContext {
        RunContext {
            out: self.out.clone(),
            rank: self.rank,
            world: self.world,
            nodes: self.nodes,
            device: self.device.clone(),
            prefetch: self.prefetch,
        }
    }

    /// Takes `rank` of a job of `world` ranks (one per node) all-reducing through `group`.
    pub fn join(&mut self, rank: usize, world: usize, group: Option<Box<dyn AllReduce>>) {
        self.nodes = world;
        self.rank = rank;
        self.world = world;
        self.group = group;
    }
}

/// The part of [`RunSettings`] a stage keeps: where the run is and this rank's place in it.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Run folder.
    pub out: PathBuf,
    /// This rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Nodes (for the learning-rate scaling).
    pub nodes: usize,
    /// An autodiff device.
    pub device: Device,
    /// Training batches made ahead.
    pub prefetch: usize,
}

impl RunContext {
    /// `source`, with [`Self::prefetch`] batches made ahead on a background thread.
    pub fn ahead(&self, source: Box<dyn BatchSource>) -> Box<dyn BatchSource> {
        ahead(source, self.prefetch)
    }
}

fn ahead(source: Box<dyn BatchSource>, depth: usize) -> Box<dyn BatchSource> {
    match depth {
        0 => source,
        depth => Box::new(Prefetched::new(source, depth)),
    }
}
