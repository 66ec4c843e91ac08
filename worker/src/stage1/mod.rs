//! Stage-1 (VQGAN) training: configuration and the training step.

pub mod checkpoint;
pub mod config;
pub mod trainer;

pub use config::Stage1Config;
pub use trainer::{Stage1Trainer, StepReport};
