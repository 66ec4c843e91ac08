//! Why a run could not start or go on.

use std::path::{Path, PathBuf};

use taming_collective::CollectiveError;
use taming_dataloader::DataError;
use taming_model::error::ModelError;

use crate::checkpoint::CheckpointError;

/// Why training could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad config, weights or model files.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The data-parallel group failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// Errors of a run: training errors, data errors, or an output folder that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Training could not start or go on.
    #[error(transparent)]
    Train(TrainError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data-parallel group failed (a peer died or timed out).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The coordinator asked the run to stop.
    #[error("stopped by the coordinator at step {0}")]
    Stopped(u64),
    /// An output could not be written.
    #[error("{}: {reason}", path.display())]
    Output {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl From<TrainError> for RunError {
    /// A failed collective stays [`RunError::Collective`] (an attempt worth restarting).
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Collective(c) => Self::Collective(c),
            other => Self::Train(other),
        }
    }
}

impl From<ModelError> for RunError {
    fn from(e: ModelError) -> Self {
        Self::Train(e.into())
    }
}

impl From<CheckpointError> for RunError {
    fn from(e: CheckpointError) -> Self {
        Self::Train(e.into())
    }
}

/// An output file or folder that could not be written or used.
pub fn output(path: &Path, reason: impl ToString) -> RunError {
    RunError::Output {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}
