//! Finding shards on the local file system.

use std::path::{Path, PathBuf};

use crate::error::DataError;

/// The `{split}-*.tar` files of `dir`, sorted by name.
pub fn list_split(dir: &Path, split: &str) -> Result<Vec<PathBuf>, DataError> {
    let prefix = format!("{split}-");
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Shard {
        shard: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut shards: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".tar")
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DataError::NoShards {
            dir: dir.to_path_buf(),
            pattern: format!("{prefix}*.tar"),
        });
    }
    Ok(shards)
}
