//! Errors of the model crate. Each names the key, tensor or file it is about.

use std::path::PathBuf;

/// Everything that can go wrong building, importing, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value is missing, malformed or inconsistent.
    #[error("config key `{key}`: {reason}")]
    Config {
        /// Dotted path of the key, e.g. `ddconfig.ch_mult`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint tensor is missing or has the wrong shape or type.
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// Name of the tensor in the checkpoint.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or is not what it should be.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O operation on a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A problem with the contents of `path`.
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A problem with tensor `name`.
    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
