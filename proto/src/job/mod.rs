//! The coordinator's messages as validated Rust types: enums for the stage, the job and rank
//! states, the collective and the conditioning, one type per stage for the stage-specific
//! fields, and a checked device. Each message is decoded once, where it arrives (the
//! coordinator's service, the worker's assignment stream, the command line's replies), by one
//! function that refuses it naming the field; the code behind sees only these types, and
//! encodes them again with `to_wire` where they leave.

//!
//! Where to look: `kinds` (the enums and [`Device`]), `spec` ([`JobSpec`] and its stage
//! parts, the `Submit` and `Cancel` messages), `messages` ([`Registration`], [`Assignment`],
//! [`ProgressReport`], [`Job`]).

mod kinds;
mod messages;
mod spec;

pub use kinds::*;
pub use messages::*;
pub use spec::*;

/// Most ranks a job may ask for.
pub const MAX_NODES: u32 = 4096;
/// Longest config text a job may carry, in bytes.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Most dataloader services a job may name.
pub const MAX_DATALOADERS: usize = 256;
/// Most losses one progress report may carry.
pub const MAX_LOSSES: usize = 64;
/// Longest message of a progress report, in bytes.
pub const MAX_REPORT_MESSAGE: usize = 4096;
/// Longest worker name or ring address, in bytes.
pub const MAX_NAME: usize = 256;
/// Most devices a worker may offer.
pub const MAX_DEVICES: usize = 64;

/// A field of a message that holds no valid value (refused with INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct DecodeError {
    /// The field, as a path from the message decoded (`spec.transformer_job.vqgan`).
    pub field: String,
    /// Why its value is refused.
    pub reason: String,
}

impl DecodeError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<DecodeError> for tonic::Status {
    fn from(e: DecodeError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

#[cfg(test)]
mod tests;
