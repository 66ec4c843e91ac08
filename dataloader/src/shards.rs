//! Shard lists: brace patterns, local directories and object-store prefixes.

use std::path::{Path, PathBuf};

use futures::StreamExt;

use crate::error::DataError;
use crate::runtime;
use crate::source::{expand_braces, local_path, locate};

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

/// The local directories a dataloader service may read shards from for its clients. Shards
/// at object-store URLs (`s3://`, `gs://`, `az://`, `memory://`) are always allowed; local
/// paths and `file://` URLs only inside one of these directories, after `..` and symbolic
/// links are resolved. With none, a service reads no local file for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataRoots {
    roots: Vec<PathBuf>,
}

impl DataRoots {
    /// These directories (each must exist).
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Self, DataError> {
        let roots = dirs
            .into_iter()
            .map(|dir| {
                match std::fs::canonicalize(&dir) {
                    Ok(c) if c.is_dir() => Ok(c),
                    Ok(_) => Err("not a directory".to_string()),
                    Err(e) => Err(e.to_string()),
                }
                .map_err(|reason| DataError::Url {
                    url: dir.display().to_string(),
                    reason: format!("data root: {reason}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots })
    }

    /// The directories, resolved.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Refuses `url` when it names a local file outside the roots. The same answer whether
    /// such a file exists or not.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let Some(path) = local_path(url).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if self.roots.is_empty() {
            return Err(format!(
                "`{url}` is a local path, and this service reads no local files (object-store \
                 URLs only; `dataloader serve --data-root DIR` allows the shards below DIR)"
            ));
        }
        let real = resolve_links(&path);
        if self.roots.iter().any(|root| real.starts_with(root)) {
            Ok(())
        } else {
            Err(format!(
                "`{url}` is outside the data roots this service reads ({})",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// `path` (absolute, without `..`) with the symbolic links of its longest existing ancestor
/// resolved, and the rest (which does not exist) appended as it is.
fn resolve_links(path: &Path) -> PathBuf {
    for ancestor in path.ancestors() {
        if let Ok(real) = std::fs::canonicalize(ancestor) {
            let rest = path.strip_prefix(ancestor).expect("an ancestor");
            return if rest.as_os_str().is_empty() {
                real
            } else {
                real.join(rest)
            };
        }
    }
    path.to_path_buf()
}

/// Objects scanned when listing a directory or prefix (its subfolders' objects count too):
/// listing stops with an error beyond this, before the listing itself grows without bound.
pub const MAX_LISTED: usize = 4 << 20;

/// `*.tar` objects directly under `dir` whose names start with `prefix`, as URLs (or paths
/// for local directories).
fn list_tars(dir: &str, prefix: &str) -> Result<Vec<String>, DataError> {
    let loc = locate(dir.trim_end_matches('/'))?;
    let (store, base) = (loc.store.clone(), loc.path.clone());
    let depth = base.parts().count() + 1;
    let prefix_owned = prefix.to_string();
    let listed = runtime::block_on(async move {
        let mut stream = store.list(Some(&base));
        let (mut scanned, mut names) = (0usize, Vec::new());
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| e.to_string())?;
            scanned += 1;
            if scanned > MAX_LISTED {
                return Err(format!("more than {MAX_LISTED} objects under it"));
            }
            let name = meta.location.filename().unwrap_or_default();
            let direct = meta.location.parts().count() == depth;
            if direct && name.starts_with(&prefix_owned) && name.ends_with(".tar") {
                names.push(name.to_string());
            }
        }
        Ok(names)
    })
    .map_err(|reason| DataError::Url {
        url: dir.to_string(),
        reason,
    })?;
    let mut names = listed;
    names.sort();
    let sep = if dir.ends_with('/') { "" } else { "/" };
    Ok(names
        .into_iter()
        .map(|n| format!("{dir}{sep}{n}"))
        .collect())
}
