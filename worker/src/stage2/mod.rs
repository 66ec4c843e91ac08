//! Stage-2 (transformer) training: configuration, data, the training step, and the stage the
//! run engine drives.

pub mod config;
pub mod data;
pub mod stage;
pub mod trainer;

pub use config::{GptShape, Schedule, Stage2Config};
pub use stage::{CondKind, TransformerPlan, TransformerStage, columns};
pub use trainer::{Stage2Trainer, StepReport};
