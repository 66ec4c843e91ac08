//! taming-rs trainers: `stage1` trains a VQGAN with the reference's objective, `stage2` the
//! latent transformer over its codes.

pub mod agent;
pub mod checkpoint;
pub mod defaults;
pub mod devices;
pub mod distributed;
pub mod failpoint;
pub mod metrics;
pub mod mirror;
pub mod settings;
pub mod stage1;
pub mod stage2;
