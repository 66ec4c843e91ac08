//! Atomic file writes: write a hidden sibling, then rename it over the destination.

use std::path::{Path, PathBuf};

use crate::error::ModelError;

/// A hidden temporary path beside `path`, unique to this process.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}{ext}", std::process::id()))
}

/// Renames `tmp` to `path`; on failure removes `tmp`.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), ModelError> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        ModelError::io(path, e)
    })
}

/// Writes `bytes` to `path` through a temporary sibling.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })?;
    commit(&tmp, path)
}
