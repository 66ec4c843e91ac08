//! NCCL through cudarc, for CUDA devices. The libraries are loaded at run time: this compiles
//! and links on machines without CUDA, and [`Nccl::new`] refuses clearly where libcuda or
//! libnccl cannot be loaded. Buffers are staged through the host (copied to the device,
//! reduced there, copied back); the unique id travels through the coordinator's rendezvous.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::{AllReduce, CollectiveError};

/// Size of an NCCL unique id, in bytes.
pub const ID_BYTES: usize = 128;

/// Why NCCL cannot run here, or `None` when both libraries load.
pub fn unavailable() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries.
    let cuda = unsafe { cudarc::driver::sys::is_culib_present() };
    if !cuda {
        return Some(
            "NCCL all-reduce needs the CUDA driver (libcuda.so), which is not installed here; \
             use the TCP ring (--collective ring) on machines without NVIDIA GPUs"
                .into(),
        );
    }
    // SAFETY: as above.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !nccl {
        return Some(
            "NCCL all-reduce needs libnccl.so.2 (NVIDIA NCCL), which is not installed here".into(),
        );
    }
    None
}

/// A fresh unique id (rank 0 makes it and shares it through the rendezvous).
pub fn new_id() -> Result<[u8; ID_BYTES], CollectiveError> {
    if let Some(why) = unavailable() {
        return Err(CollectiveError::Unavailable(why));
    }
    let id =
        Id::new().map_err(|e| CollectiveError::Unavailable(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().map(|c| c as u8))
}

/// An NCCL communicator on one CUDA device.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it are
// not concurrent; every use here goes through `&mut self`.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the group `id` as `rank` of `world` on CUDA device `ordinal`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: [u8; ID_BYTES],
    ) -> Result<Self, CollectiveError> {
        if let Some(why) = unavailable() {
            return Err(CollectiveError::Unavailable(why));
        }
        let fail = |what: &str, e: String| {
            CollectiveError::Unavailable(format!("rank {rank}: {what}: {e}"))
        };
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| fail("opening the CUDA device", format!("{e:?}")))?;
        let stream = ctx.default_stream();
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| fail("ncclCommInitRank", format!("{e:?}")))?;
        Ok(Self {
            comm,
            stream,
            rank,
            world,
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Debug) -> CollectiveError {
        CollectiveError::Protocol {
            rank: self.rank,
            reason: format!("{what}: {e:?}"),
        }
    }
}

impl AllReduce for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(|e| self.err("copy to device", e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| self.err("ncclAllReduce", e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| self.err("copy to host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(|e| self.err("copy to device", e))?;
        self.comm
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(|e| self.err("ncclBroadcast", e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| self.err("copy to host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))
    }
}
