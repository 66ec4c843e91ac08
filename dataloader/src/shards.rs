//! Shard lists: brace patterns, local directories and object-store prefixes.

use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::runtime;
use crate::source::{expand_braces, locate};

/// The `{split}-*.tar` shards under a local directory or an object-store prefix, sorted.
pub fn list_split(dir: impl AsRef<Path>, split: &str) -> Result<Vec<String>, DataError> {
    let dir = dir.as_ref().to_string_lossy().into_owned();
    let prefix = format!("{split}-");
    let shards = list_tars(&dir, &prefix)?;
    if shards.is_empty() {
        return Err(DataError::NoShards {
            dir: PathBuf::from(dir),
            pattern: format!("{prefix}*.tar"),
        });
    }
    Ok(shards)
}

/// Shards named by `spec`: a brace pattern (`s3://b/train-{000..099}.tar`), a single shard,
/// or a directory / prefix ending in `/` (all `*.tar` below it, sorted).
pub fn resolve(spec: &str) -> Result<Vec<String>, DataError> {
    if spec.contains('{') {
        return expand_braces(spec);
    }
    let is_dir = spec.ends_with('/') || Path::new(spec).is_dir();
    if !is_dir {
        return Ok(vec![spec.to_string()]);
    }
    let shards = list_tars(spec, "")?;
    if shards.is_empty() {
        return Err(DataError::NoShards {
            dir: PathBuf::from(spec),
            pattern: "*.tar".into(),
        });
    }
    Ok(shards)
}

/// `*.tar` objects directly under `dir` whose names start with `prefix`, as URLs (or paths
/// for local directories).
fn list_tars(dir: &str, prefix: &str) -> Result<Vec<String>, DataError> {
    let loc = locate(dir.trim_end_matches('/'))?;
    let (store, base) = (loc.store.clone(), loc.path.clone());
    let listed = runtime::block_on(async move {
        store
            .list_with_delimiter(Some(&base))
            .await
            .map(|l| l.objects)
    })
    .map_err(|e| DataError::Url {
        url: dir.to_string(),
        reason: e.to_string(),
    })?;
    let mut names: Vec<String> = listed
        .into_iter()
        .filter_map(|o| o.location.filename().map(str::to_string))
        .filter(|n| n.starts_with(prefix) && n.ends_with(".tar"))
        .collect();
    names.sort();
    let sep = if dir.ends_with('/') { "" } else { "/" };
    Ok(names
        .into_iter()
        .map(|n| format!("{dir}{sep}{n}"))
        .collect())
}
