//! Batches made ahead: a [`BatchSource`] that runs another on a background thread, so that
//! decoding the next batches overlaps the trainer's step (what PyTorch's `DataLoader` does
//! with workers and `prefetch_factor`). The batches, their order and the resume position are
//! those of the source it wraps; only their timing changes.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::error::DataError;
use crate::loader::{BatchSource, ImageBatch};
use crate::reader::LoaderState;

/// A batch made ahead, with the source's skip count after making it.
struct Ahead {
    batch: Result<ImageBatch, DataError>,
    skipped: u64,
}

/// A [`BatchSource`] whose batches are made on a background thread, at most `depth` of
/// them waiting (and one more being made).
pub struct Prefetched {
    queue: Receiver<Ahead>,
    producer: Option<JoinHandle<()>>,
    state: LoaderState,
    skipped: u64,
}

impl Prefetched {
    /// Starts making batches of `source` ahead, keeping up to `depth` (at least 1) ready.
    pub fn new(source: Box<dyn BatchSource>, depth: usize) -> Self {
        let (state, skipped) = (source.state(), source.skipped());
        let (tx, queue) = sync_channel(depth.max(1));
        let producer = std::thread::Builder::new()
            .name("batch-prefetch".into())
            .spawn(move || produce(source, &tx))
            .expect("spawning the batch prefetch thread");
        Self {
            queue,
            producer: Some(producer),
            state,
            skipped,
        }
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

/// Sends batches until the queue's reader is gone or the source fails.
fn produce(mut source: Box<dyn BatchSource>, tx: &SyncSender<Ahead>) {
    loop {
        let batch = source.next_batch();
        let failed = batch.is_err();
        let ahead = Ahead {
            batch,
            skipped: source.skipped(),
        };
        if tx.send(ahead).is_err() || failed {
            return;
        }
    }
}

impl BatchSource for Prefetched {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        let Ok(ahead) = self.queue.recv() else {
            return Err(self.stopped());
        };
        self.skipped = ahead.skipped;
        let batch = ahead.batch?;
        self.state = batch.state.clone();
        Ok(batch)
    }

    /// The position after the last batch handed out (not after those made ahead).
    fn state(&self) -> LoaderState {
        self.state.clone()
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }
}
