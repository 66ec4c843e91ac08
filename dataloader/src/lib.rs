//! Data for taming-rs: WebDataset tar shards streamed from object storage (S3, GCS, Azure,
//! local, memory), samples grouped by key, split across ranks and read slots, shuffled,
//! decoded and augmented in parallel as the reference does (shorter side to size, random or
//! center crop, optional flip, x/127.5 - 1), batched, with a small resumable position; the
//! batch service and its client; shard packing; and the code-index Parquet of stage 2.
//!
//! This crate computes no gradients and does not depend on burn: batches are plain buffers
//! that trainers turn into tensors.
//!
//! Where to look: [`source`], [`shards`] and [`stream`] (where shards live, shard lists, a
//! shard as a bounded stream); [`tar_bound`] (tar members bounded as their headers stream
//! past); [`reader`] (one rank's sample stream and its [`LoaderState`]); [`sample`],
//! [`label_map`], [`transform`] and [`jpeg`] (what a sample holds, decoding and
//! augmentation, JPEG crops decoded at a reduced scale);
//! [`loader`] and [`prefetch`] (batches, made ahead); [`service`] and [`client`] (the batch
//! service and its fail-over client); [`pack`] and [`codes`] (shard packing, code Parquet).

pub mod bounds;
pub mod client;
pub mod codes;
pub mod error;
pub mod failpoint;
pub mod jpeg;
pub mod label_map;
pub mod loader;
pub mod pack;
pub mod prefetch;
pub mod reader;
pub mod runtime;
pub mod sample;
pub mod service;
pub mod shards;
pub mod source;
pub mod stream;
pub mod tar_bound;
pub mod transform;

pub use error::DataError;
pub use loader::{Batch, BatchSource, ImageBatch, LoaderConfig, PixelBatch, ShardLoader};
pub use prefetch::Prefetched;
pub use reader::{LoaderState, ReaderConfig};
pub use transform::Preprocess;
