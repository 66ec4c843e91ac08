//! The training thread's work counter. The heartbeat carries it to the coordinator, which
//! takes a change for progress of the rank between step reports: an evaluation, the
//! pictures or a checkpoint can outlast the progress timeout without being taken for a hang,
//! while a rank stuck in a collective or a kernel counts nothing.

use std::sync::atomic::{AtomicU64, Ordering};

static WORK: AtomicU64 = AtomicU64::new(0);

/// Counts a piece of work done (a step, an evaluation batch, a picture, a checkpoint).
pub fn beat() {
    WORK.fetch_add(1, Ordering::Relaxed);
}

/// The pieces of work done by this process so far.
pub fn work() -> u64 {
    WORK.load(Ordering::Relaxed)
}
