//! taming-rs trainers and the worker that runs them.
//!
//! - [`engine`]: the run engine both stages go through (the [`engine::Stage`] and
//!   [`engine::Plan`] traits and the loop, `metrics.csv`, run errors);
//! - [`learner`]: the data-parallel optimizer step (a module with its optimizer, gradient
//!   accumulation, the timed group), over [`distributed`]'s collectives;
//! - [`stage1`], [`stage2`]: each stage's config, training step and what it writes;
//! - [`plan`]: a job (from the command line or the coordinator) as a run plan;
//! - [`cli`]: the `worker` command line;
//! - [`agent`]: the cluster worker (registration, heartbeats, assignments, the ring);
//!   [`local_ranks`]: one worker process per local device (`--nproc-per-node`);
//! - [`checkpoint`], [`mirror`]: checkpoints with attempt fencing and their object-store copy;
//! - [`tensorboard`]: the event files every run writes;
//! - [`liveness`]: the work counter heartbeats carry (progress between steps);
//! - [`settings`], [`devices`], [`metrics`], [`defaults`], [`failpoint`].

pub mod agent;
pub mod checkpoint;
pub mod cli;
pub mod defaults;
pub mod devices;
pub mod distributed;
pub mod engine;
pub mod failpoint;
pub mod learner;
pub mod liveness;
pub mod local_ranks;
pub mod metrics;
pub mod mirror;
pub mod plan;
pub mod settings;
pub mod stage1;
pub mod stage2;
pub mod tensorboard;
