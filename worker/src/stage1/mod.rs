//! Stage-1 (VQGAN) training: configuration and the training step.

pub mod config;
pub mod report;
pub mod run;
pub mod trainer;

pub use config::{Objective, Stage1Config};
pub use run::{RunError, RunOptions, RunSummary, run_stage1};
pub use trainer::{Stage1Trainer, StepReport};
