//! Training checkpoints (both stages). Each is a directory `ckpt-NNNNNNNN` beside a `latest`
//! file naming the newest: `config.json`, `state.json` (step, data position, and for stage 1
//! the codebook-maintenance state), the modules as burnpack with parameter ids kept so that
//! optimizer states still match (stage 1: `model.bpk`, `disc.bpk`, `opt_ae.bpk`, `opt_d.bpk`;
//! stage 2: `gpt.bpk`, `opt.bpk`). A checkpoint is written under a temporary name and renamed
//! when complete, then `latest` is replaced atomically: a process killed at any point leaves
//! the previous checkpoint intact and loadable.

use std::fs;
use std::path::{Path, PathBuf};

use burn::store::{BurnpackStore, ModuleSnapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// File naming the newest checkpoint directory inside a run folder.
pub const LATEST: &str = "latest";

/// Why a checkpoint could not be written or read; names the path.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {}: {reason}", path.display())]
pub struct CheckpointError {
    /// The file or directory.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

impl CheckpointError {
    /// An error about `path`.
    pub fn new(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// A training state that knows its step.
pub trait HasStep {
    /// Optimizer steps taken.
    fn step(&self) -> u64;
}

/// Saves a module's parameters (ids kept) as burnpack.
pub fn save_module<M: ModuleSnapshot>(module: &M, path: &Path) -> Result<(), CheckpointError> {
    let mut store = BurnpackStore::from_file(path)
        .auto_extension(false)
        .overwrite(true);
    module
        .save_into(&mut store)
        .map_err(|e| CheckpointError::new(path, e))
}

/// Loads every parameter of `module` from a burnpack file; errors name the file.
pub fn load_module<M: ModuleSnapshot>(module: &mut M, path: &Path) -> Result<(), CheckpointError> {
    let mut store = BurnpackStore::from_file(path).auto_extension(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| CheckpointError::new(path, e))?;
    if let Some(err) = result.errors.first() {
        return Err(CheckpointError::new(path, err));
    }
    if let Some((name, why)) = result.missing.first() {
        return Err(CheckpointError::new(
            path,
            format!("tensor `{name}` missing ({why})"),
        ));
    }
    Ok(())
}

/// Writes a checkpoint for `step` into `run`: `write_payload` fills the staging directory
/// with the binary files; this adds `config.json` and `state.json`, renames the directory
/// into place, points `latest` at it and keeps the newest `keep` checkpoints.
pub fn write<C: Serialize, S: Serialize + HasStep>(
    run: &Path,
    config: &C,
    state: &S,
    keep: usize,
    write_payload: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(run).map_err(|e| CheckpointError::new(run, e))?;
    let name = format!("ckpt-{:08}", state.step());
    let final_dir = run.join(&name);
    let staging = run.join(format!(".{name}.partial-{}", unique_suffix()));
    let _ = fs::remove_dir_all(&staging);
    let result = (|| {
        fs::create_dir_all(&staging).map_err(|e| CheckpointError::new(&staging, e))?;
        write_json(&staging.join("config.json"), config)?;
        write_json(&staging.join("state.json"), state)?;
        write_payload(&staging)?;
        let _ = fs::remove_dir_all(&final_dir);
        fs::rename(&staging, &final_dir).map_err(|e| CheckpointError::new(&final_dir, e))?;
        taming_model::atomic::write(&run.join(LATEST), name.as_bytes())
            .map_err(|e| CheckpointError::new(run.join(LATEST), e))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    prune(run, keep);
    Ok(final_dir)
}

/// The file in a run's checkpoint folder naming the newest attempt of a cluster job that
/// claimed the run: older attempts (a partitioned worker still running after its job was
/// restarted elsewhere) may no longer write checkpoints.
pub const FENCE: &str = "fence";

/// The attempt that claimed `run` (0: none).
pub fn fenced(run: &Path) -> Result<u32, CheckpointError> {
    let path = run.join(FENCE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            CheckpointError::new(&path, format!("`{}` is not an attempt number", text.trim()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(CheckpointError::new(&path, e)),
    }
}

/// Refuses when an attempt newer than `attempt` claimed `run` (attempt 0, a run outside a
/// cluster job, is never fenced).
pub fn check_fence(run: &Path, attempt: u32) -> Result<(), CheckpointError> {
    let holder = fenced(run)?;
    if attempt > 0 && holder > attempt {
        return Err(CheckpointError::new(
            run.join(FENCE),
            format!("attempt {attempt} is stale: attempt {holder} holds this run; not writing"),
        ));
    }
    Ok(())
}

/// Claims `run` for `attempt` (rank 0 at the start of an attempt); refused when a newer one
/// holds it.
pub fn claim(run: &Path, attempt: u32) -> Result<(), CheckpointError> {
    if attempt == 0 {
        return Ok(());
    }
    check_fence(run, attempt)?;
    fs::create_dir_all(run).map_err(|e| CheckpointError::new(run, e))?;
    taming_model::atomic::write(&run.join(FENCE), attempt.to_string().as_bytes())
        .map_err(|e| CheckpointError::new(run.join(FENCE), e))
}

/// A name for a staging file or folder that no other process picks, even one with the same
/// PID in another container sharing the run folder: the PID and 64 random bits.
pub fn unique_suffix() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Checks a checkpoint name read from a `latest` pointer (local or remote): `ckpt-` and
/// digits, one path component, so that a forged pointer cannot name a path outside the run.
pub fn checkpoint_name<'a>(pointer: &Path, name: &'a str) -> Result<&'a str, CheckpointError> {
    let name = name.trim();
    match name.strip_prefix("ckpt-") {
        Some(digits)
            if !digits.is_empty()
                && digits.len() <= 20
                && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(name)
        }
        _ => Err(CheckpointError::new(
            pointer,
            format!(
                "names `{}`, not a checkpoint (ckpt-NNNNNNNN)",
                name.escape_debug()
            ),
        )),
    }
}

/// The newest complete checkpoint of `run`.
pub fn latest(run: &Path) -> Result<PathBuf, CheckpointError> {
    let pointer = run.join(LATEST);
    let name = fs::read_to_string(&pointer).map_err(|e| CheckpointError::new(&pointer, e))?;
    let dir = run.join(checkpoint_name(&pointer, &name)?);
    if !dir.is_dir() {
        return Err(CheckpointError::new(&dir, "named by `latest` but missing"));
    }
    Ok(dir)
}

/// Reads `config.json` and `state.json` of a checkpoint directory.
pub fn read_meta<C: DeserializeOwned, S: DeserializeOwned>(
    dir: &Path,
) -> Result<(C, S), CheckpointError> {
    Ok((
        read_json(&dir.join("config.json"))?,
        read_json(&dir.join("state.json"))?,
    ))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::new(path, e))?;
    fs::write(path, text).map_err(|e| CheckpointError::new(path, e))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    let text = fs::read_to_string(path).map_err(|e| CheckpointError::new(path, e))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::new(path, e))
}

/// Removes all but the newest `keep` complete checkpoints (never the one `latest` names).
fn prune(run: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(run) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
        })
        .collect();
    dirs.sort();
    let newest = latest(run).ok();
    let excess = dirs.len().saturating_sub(keep.max(1));
    for dir in dirs.into_iter().take(excess) {
        if Some(&dir) != newest.as_ref() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_attempt_fences_older_ones_out_of_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("checkpoints");
        check_fence(&run, 1).unwrap();
        claim(&run, 1).unwrap();
        claim(&run, 2).unwrap();
        let e = check_fence(&run, 1).unwrap_err().to_string();
        assert!(
            e.contains("attempt 1 is stale: attempt 2 holds this run"),
            "{e}"
        );
        assert!(
            claim(&run, 1).is_err(),
            "an old attempt cannot take the run back"
        );
        check_fence(&run, 2).unwrap();
        check_fence(&run, 0).unwrap();
        fs::write(run.join(FENCE), "x").unwrap();
        assert!(
            check_fence(&run, 1)
                .unwrap_err()
                .to_string()
                .contains("not an attempt number")
        );
    }

    #[test]
    fn forged_latest_pointers_are_refused() {
        let p = Path::new("latest");
        for bad in ["../x", "ckpt-1/../../etc", "/etc", "ckpt-", "ckpt-12a", ""] {
            assert!(checkpoint_name(p, bad).is_err(), "{bad}");
        }
        assert_eq!(
            checkpoint_name(p, "ckpt-00000012\n").unwrap(),
            "ckpt-00000012"
        );
    }
}
