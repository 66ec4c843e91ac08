//! Data for taming-rs: WebDataset tar shards read as streams, samples grouped by key,
//! decoded and augmented as the reference does (shorter side to size, random or center crop,
//! optional flip, x/127.5 - 1), batched, with a small resumable position.
//!
//! This crate computes no gradients and does not depend on burn: batches are plain `f32`
//! buffers that trainers turn into tensors.

pub mod error;
pub mod loader;
pub mod shards;
pub mod transform;

pub use error::DataError;
pub use loader::{ImageBatch, LoaderConfig, LoaderState, ShardLoader};
pub use transform::Preprocess;
