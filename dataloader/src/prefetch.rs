//! Batches made ahead: a [`BatchSource`] that runs another on a background thread, so that
//! decoding the next batches overlaps the trainer's step (what PyTorch's `DataLoader` does
//! with workers and `prefetch_factor`). The batches, their order and the resume position are
//! those of the source it wraps; only their timing changes.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::error::DataError;
use crate::loader::{BatchSource, ImageBatch, ShardLoader};
use crate::reader::LoaderState;

/// A batch made ahead (`None`: the end of a single epoch), with the source's skip count
/// after making it.
struct Ahead {
    batch: Result<Option<ImageBatch>, DataError>,
    skipped: u64,
}

/// Batches made on a background thread, at most `depth` of them waiting (and one more
/// being made).
pub struct Prefetched {
    queue: Receiver<Ahead>,
    producer: Option<JoinHandle<()>>,
    state: LoaderState,
    skipped: u64,
    ended: bool,
}

impl Prefetched {
    /// Starts making batches of `source` ahead, keeping up to `depth` (at least 1) ready.
    pub fn new(mut source: Box<dyn BatchSource>, depth: usize) -> Self {
        let start = (source.state(), source.skipped());
        Self::start(start, depth, move || {
            (source.next_batch().map(Some), source.skipped())
        })
    }

    /// Makes the batches of `loader`'s current epoch ahead; [`Self::next_in_epoch`] gives
    /// `None` once they are all handed out.
    pub fn epoch(mut loader: ShardLoader, depth: usize) -> Self {
        let start = (loader.state(), loader.skipped());
        Self::start(start, depth, move || {
            (loader.next_in_epoch(), loader.skipped())
        })
    }

    fn start<F>((state, skipped): (LoaderState, u64), depth: usize, make: F) -> Self
    where
        F: FnMut() -> (Result<Option<ImageBatch>, DataError>, u64) + Send + 'static,
    {
        let (tx, queue) = sync_channel(depth.max(1));
        let producer = std::thread::Builder::new()
            .name("batch-prefetch".into())
            .spawn(move || produce(make, &tx))
            .expect("spawning the batch prefetch thread");
        Self {
            queue,
            producer: Some(producer),
            state,
            skipped,
            ended: false,
        }
    }

    /// The next batch; `None` at the end of an [`Self::epoch`].
    pub fn next_in_epoch(&mut self) -> Result<Option<ImageBatch>, DataError> {
        if self.ended {
            return Ok(None);
        }
        let Ok(ahead) = self.queue.recv() else {
            return Err(self.stopped());
        };
        self.skipped = ahead.skipped;
        let Some(batch) = ahead.batch? else {
            self.ended = true;
            return Ok(None);
        };
        self.state = batch.state.clone();
        Ok(Some(batch))
    }

    /// Why no more batches come once the producer is gone: its panic, if it panicked.
    fn stopped(&mut self) -> DataError {
        let why = match self.producer.take().map(JoinHandle::join) {
            Some(Err(panic)) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "it panicked".into()),
            _ => "it stopped after the error it reported".into(),
        };
        DataError::Prefetch {
            reason: format!("ended: {why}"),
        }
    }
}

/// Sends batches until the queue's reader is gone, the source fails or its epoch ends.
fn produce<F>(mut make: F, tx: &SyncSender<Ahead>)
where
    F: FnMut() -> (Result<Option<ImageBatch>, DataError>, u64),
{
    loop {
        let (batch, skipped) = make();
        let last = !matches!(batch, Ok(Some(_)));
        if tx.send(Ahead { batch, skipped }).is_err() || last {
            return;
        }
    }
}

impl BatchSource for Prefetched {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        self.next_in_epoch()?.ok_or_else(|| DataError::Prefetch {
            reason: "its single epoch has ended".into(),
        })
    }

    /// The position after the last batch handed out (not after those made ahead).
    fn state(&self) -> LoaderState {
        self.state.clone()
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }
}
