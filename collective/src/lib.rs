//! Collectives for data-parallel training: one [`AllReduce`] trait, implemented by a
//! bandwidth-optimal ring over TCP ([`TcpRing`]: reduce-scatter then all-gather, for CPU and
//! Vulkan devices and tests) and by NCCL through cudarc ([`nccl::Nccl`], CUDA devices; loaded
//! at run time, refused clearly when libcuda or libnccl is absent).
//!
//! Buffers are host `f32` slices; callers bucket large gradient sets through
//! [`all_reduce_mean`].

pub mod nccl;
pub mod ring;

pub use ring::{RingConfig, RingSecret, TcpRing, random_secret};

/// What can go wrong in a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer could not be reached, hung up, or was too slow.
    #[error("rank {rank}: {what}: {source}")]
    Io {
        /// This rank.
        rank: usize,
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A peer that is not part of this group, or a mismatched call.
    #[error("rank {rank}: {reason}")]
    Protocol {
        /// This rank.
        rank: usize,
        /// What did not match.
        reason: String,
    },
    /// The backend cannot run here (no CUDA driver, no NCCL library).
    #[error("{0}")]
    Unavailable(String),
}

/// An all-reduce group of `world_size` ranks.
pub trait AllReduce: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place; every rank passes the same length.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Copies `root`'s `buf` into every rank's.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
}

/// Floats per all-reduce call when bucketing (16 MiB of gradients).
pub const BUCKET: usize = 4 << 20;

/// Mean over ranks, in buckets of [`BUCKET`] floats.
pub fn all_reduce_mean(group: &mut dyn AllReduce, buf: &mut [f32]) -> Result<(), CollectiveError> {
    let n = group.world_size() as f32;
    if group.world_size() == 1 {
        return Ok(());
    }
    for bucket in buf.chunks_mut(BUCKET) {
        group.all_reduce_sum(bucket)?;
        bucket.iter_mut().for_each(|v| *v /= n);
    }
    Ok(())
}
