//! Stage-2 (transformer) training: configuration, data, the training step and whole runs.

pub mod config;
pub mod data;
pub mod run;
pub mod trainer;

pub use config::{GptShape, Schedule, Stage2Config};
pub use run::{CondKind, Stage2Hook, Stage2Options, Stage2Row, Stage2Summary, run_stage2};
pub use trainer::{Stage2Report, Stage2Trainer};
