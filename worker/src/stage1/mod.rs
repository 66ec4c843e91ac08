//! Stage-1 (VQGAN) training: configuration, the training step, and the stage the run engine
//! drives.

pub mod config;
pub mod report;
pub mod stage;
pub mod trainer;

pub use config::{Objective, Stage1Config};
pub use stage::{VqganPlan, VqganStage, columns};
pub use trainer::{Stage1State, Stage1Trainer, StepReport};
