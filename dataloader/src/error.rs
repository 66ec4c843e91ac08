//! Data errors; each names the shard, sample key or directory at fault.

use std::path::PathBuf;

/// What can go wrong reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No shards where some were expected.
    #[error("{}: no `{pattern}` shards found", dir.display())]
    NoShards {
        /// The directory searched.
        dir: PathBuf,
        /// The file pattern looked for.
        pattern: String,
    },
    /// A shard could not be opened or read.
    #[error("shard {}: {reason}", shard.display())]
    Shard {
        /// The shard.
        shard: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Every sample of a whole pass was unusable.
    #[error("no usable sample in {shards} shard(s); {skipped} skipped")]
    Empty {
        /// Shards read.
        shards: usize,
        /// Samples skipped as unusable.
        skipped: u64,
    },
}
