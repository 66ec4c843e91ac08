//! Data errors; each names the URL, shard, sample key or field at fault.

use std::path::PathBuf;

/// What can go wrong reading or writing a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No shards where some were expected.
    #[error("{}: no `{pattern}` shards found", dir.display())]
    NoShards {
        /// The directory or prefix searched.
        dir: PathBuf,
        /// The file pattern looked for.
        pattern: String,
    },
    /// A URL or shard pattern that cannot be used.
    #[error("{url}: {reason}")]
    Url {
        /// The URL or pattern.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A shard could not be opened or read.
    #[error("shard {}: {reason}", shard.display())]
    Shard {
        /// The shard.
        shard: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A resume state or reader setting that does not fit the data.
    #[error("reader state: {reason}")]
    State {
        /// What does not fit.
        reason: String,
    },
    /// Every sample of a whole pass was unusable.
    #[error("no usable sample in a whole epoch; {skipped} skipped")]
    Empty {
        /// Samples skipped as unusable.
        skipped: u64,
    },
    /// Writing output (shards, Parquet, manifests) failed.
    #[error("writing {target}: {reason}")]
    Write {
        /// The file or URL being written.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// The dataloader service failed or refused.
    #[error("dataloader service {addr}: {reason}")]
    Service {
        /// The service address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The thread making batches ahead stopped (see [`crate::prefetch`]).
    #[error("batch prefetch thread: {reason}")]
    Prefetch {
        /// Why it stopped.
        reason: String,
    },
}
