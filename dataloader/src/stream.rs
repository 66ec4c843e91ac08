//! A shard as a `Read` stream: object-store GET bodies pulled in chunks by the I/O runtime
//! into a bounded queue, so a shard is never downloaded whole before use and at most
//! `prefetch` chunks wait in memory per open shard.

use std::io::Read;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, GetRange};
use tokio::sync::mpsc;

use crate::error::DataError;
use crate::runtime;
use crate::source::Location;

/// Chunks queued ahead of the reader per open shard.
pub const DEFAULT_PREFETCH: usize = 8;

/// A streaming reader over one object.
pub struct ObjectReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    task: tokio::task::JoinHandle<()>,
}

impl ObjectReader {
    /// Starts streaming `loc` from byte `start`, keeping at most `prefetch` chunks queued.
    pub fn open(loc: &Location, start: u64, prefetch: usize) -> Result<Self, DataError> {
        let opts = GetOptions {
            range: (start > 0).then_some(GetRange::Offset(start)),
            ..Default::default()
        };
        let (store, path) = (loc.store.clone(), loc.path.clone());
        let result =
            runtime::block_on(async move { store.get_opts(&path, opts).await }).map_err(|e| {
                DataError::Shard {
                    shard: loc.url.clone().into(),
                    reason: e.to_string(),
                }
            })?;
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let task = runtime::io().spawn(async move {
            let mut body = result.into_stream();
            while let Some(chunk) = body.next().await {
                let item = chunk.map_err(std::io::Error::other);
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Self {
            rx,
            current: Bytes::new(),
            task,
        })
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
