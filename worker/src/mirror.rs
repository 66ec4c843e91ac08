//! A run folder's copy in object storage (`--checkpoint-url s3://bucket/run`, or gs://, az://,
//! file://, memory://): what a restart on other machines needs to continue the run. The
//! remote copy mirrors the run folder's layout: `checkpoints/ckpt-NNNNNNNN/*`,
//! `checkpoints/latest`, `loader/*.json` (data positions of ranks > 0) and `metrics.csv`.
//!
//! A checkpoint's files are uploaded first (large ones in parts, streamed from disk), then
//! `metrics.csv`, and `checkpoints/latest` last: a process killed during an upload leaves the
//! previous checkpoint named and whole. [`Uploader`] does this on a thread of its own, one
//! checkpoint at a time, while training goes on. Pulling downloads into a staging folder renamed into
//! place, so a local checkpoint is never half-present either.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use taming_dataloader::runtime;
use taming_dataloader::source::{Location, locate};

use crate::checkpoint::{self, CheckpointError, FENCE, LATEST, checkpoint_name, unique_suffix};

/// Objects above this size are uploaded in parts of this size.
const PART_BYTES: usize = 16 << 20;

/// The object-store copy of one run folder.
#[derive(Debug, Clone)]
pub struct RunMirror {
    root: Location,
}

impl RunMirror {
    /// The copy at `url` (a prefix; nothing is written until the first push).
    pub fn open(url: &str) -> Result<Self, CheckpointError> {
        let url = url.trim_end_matches('/');
        let root = locate(url).map_err(|e| CheckpointError::new(url, e))?;
        Ok(Self { root })
    }

    /// The URL as the user gave it.
    pub fn url(&self) -> &str {
        &self.root.url
    }

    fn path(&self, rel: &str) -> StorePath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.path.clone(), |p, part| p.join(part))
    }

    fn error(&self, rel: &str, reason: impl ToString) -> CheckpointError {
        CheckpointError::new(format!("{}/{rel}", self.root.url), reason)
    }

    /// The checkpoint `checkpoints/latest` names in the copy, if any.
    pub fn latest(&self) -> Result<Option<String>, CheckpointError> {
        let rel = format!("checkpoints/{LATEST}");
        let path = self.path(&rel);
        let store = self.root.store.clone();
        let got = runtime::block_on(async move { store.get(&path).await?.bytes().await });
        match got {
            Ok(bytes) => {
                let name = String::from_utf8_lossy(&bytes);
                let pointer = std::path::PathBuf::from(format!("{}/{rel}", self.root.url));
                Ok(Some(checkpoint_name(&pointer, &name)?.to_string()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&rel, e)),
        }
    }

    /// Uploads the run-relative file `rel` of the run folder `out`.
    pub fn push_file(&self, out: &Path, rel: &str) -> Result<(), CheckpointError> {
        let file = out.join(rel);
        let path = self.path(rel);
        let store = self.root.store.clone();
        runtime::block_on(put_file(store.as_ref(), &path, &file)).map_err(|e| self.error(rel, e))
    }

    /// Uploads the finished run's outputs that exist in `out`: the files of `model/`, then
    /// `metrics.csv` and the report images (`loss.png`, `val_grid.png`, `samples.png`).
    pub fn push_outputs(&self, out: &Path) -> Result<(), CheckpointError> {
        let mut files: Vec<String> = files_in(&out.join("model"))?
            .iter()
            .map(|p| format!("model/{}", file_name(p)))
            .collect();
        files.extend(
            ["metrics.csv", "loss.png", "val_grid.png", "samples.png"]
                .into_iter()
                .filter(|f| out.join(f).is_file())
                .map(String::from),
        );
        files.iter().try_for_each(|rel| self.push_file(out, rel))
    }

    /// The attempt that claimed the copy (`checkpoints/fence`; 0: none).
    fn fence(&self) -> Result<u32, CheckpointError> {
        let rel = format!("checkpoints/{FENCE}");
        let path = self.path(&rel);
        let store = self.root.store.clone();
        let got = runtime::block_on(async move { store.get(&path).await?.bytes().await });
        match got {
            Ok(bytes) => String::from_utf8_lossy(&bytes)
                .trim()
                .parse()
                .map_err(|_| self.error(&rel, "not an attempt number")),
            Err(object_store::Error::NotFound { .. }) => Ok(0),
            Err(e) => Err(self.error(&rel, e)),
        }
    }

    /// Claims the copy for the attempt that claimed the run folder `out` (its
    /// `checkpoints/fence`): refused when a newer attempt holds the copy; nothing to do
    /// outside a cluster job.
    pub fn claim(&self, out: &Path) -> Result<(), CheckpointError> {
        let ours = checkpoint::fenced(&out.join("checkpoints"))?;
        if ours == 0 {
            return Ok(());
        }
        let holder = self.fence()?;
        if holder > ours {
            return Err(self.error(
                &format!("checkpoints/{FENCE}"),
                format!("attempt {ours} is stale: attempt {holder} holds this run; not uploading"),
            ));
        }
        if holder < ours {
            self.push_file(out, &format!("checkpoints/{FENCE}"))?;
        }
        Ok(())
    }

    /// Uploads the checkpoint directory `dir` (inside `out/checkpoints`) and `metrics.csv`,
    /// then names the checkpoint in `checkpoints/latest`, then removes remote checkpoints
    /// that the local folder has pruned. An attempt that a newer one replaced (the copy's
    /// fence) uploads nothing, and does not name its checkpoint if it was replaced meanwhile.
    pub fn push_checkpoint(&self, out: &Path, dir: &Path) -> Result<(), CheckpointError> {
        let name = dir
            .file_name()
            .ok_or_else(|| CheckpointError::new(dir, "not a checkpoint directory"))?
            .to_string_lossy()
            .into_owned();
        self.claim(out)?;
        for file in files_in(dir)? {
            self.push_file(out, &format!("checkpoints/{name}/{}", file_name(&file)))?;
        }
        if out.join("metrics.csv").exists() {
            self.push_file(out, "metrics.csv")?;
        }
        if let Some(step) = name.strip_prefix("ckpt-").and_then(|d| d.parse().ok()) {
            crate::failpoint::in_upload(step);
        }
        self.claim(out)?;
        self.push_file(out, &format!("checkpoints/{LATEST}"))?;
        self.prune(out, &name)
    }

    /// Deletes remote checkpoints that are gone from `out/checkpoints` (never `keep`).
    fn prune(&self, out: &Path, keep: &str) -> Result<(), CheckpointError> {
        let prefix = self.path("checkpoints");
        let store = self.root.store.clone();
        let listed =
            runtime::block_on(async move { store.list_with_delimiter(Some(&prefix)).await })
                .map_err(|e| self.error("checkpoints", e))?;
        for dir in listed.common_prefixes {
            let name = dir.filename().unwrap_or_default().to_string();
            if name.starts_with("ckpt-")
                && name != keep
                && !out.join("checkpoints").join(&name).exists()
            {
                self.delete_prefix(&format!("checkpoints/{name}"))?;
            }
        }
        Ok(())
    }

    fn delete_prefix(&self, rel: &str) -> Result<(), CheckpointError> {
        let prefix = self.path(rel);
        let store = self.root.store.clone();
        runtime::block_on(async move {
            let objects: Vec<_> = store.list(Some(&prefix)).collect().await;
            for meta in objects {
                store.delete(&meta?.location).await?;
            }
            Ok::<_, object_store::Error>(())
        })
        .map_err(|e| self.error(rel, e))
    }

    /// Brings the copy's newest checkpoint into `out` when `out` lacks it, with the data
    /// positions of the other ranks and `metrics.csv`. Returns whether the copy had one.
    pub fn pull(&self, out: &Path) -> Result<bool, CheckpointError> {
        let Some(name) = self.latest()? else {
            return Ok(false);
        };
        let ckpts = out.join("checkpoints");
        let local = fs::read_to_string(ckpts.join(LATEST)).unwrap_or_default();
        if local.trim() == name && ckpts.join(&name).is_dir() {
            return Ok(true);
        }
        tracing::info!(checkpoint = %name, from = %self.root.url, "pulling the latest checkpoint");
        self.pull_dir(&format!("checkpoints/{name}"), &ckpts.join(&name))?;
        self.pull_prefix("loader", &out.join("loader"))?;
        self.pull_file("metrics.csv", &out.join("metrics.csv"))?;
        taming_model::atomic::write(&ckpts.join(LATEST), name.as_bytes())
            .map_err(|e| CheckpointError::new(ckpts.join(LATEST), e))?;
        Ok(true)
    }

    /// Downloads every object under `rel` into a staging folder renamed to `dest`.
    fn pull_dir(&self, rel: &str, dest: &Path) -> Result<(), CheckpointError> {
        if dest.is_dir() {
            return Ok(());
        }
        let parent = dest.parent().expect("inside the run folder");
        let staging = parent.join(format!(
            ".{}.pulling-{}",
            dest.file_name().expect("named").to_string_lossy(),
            unique_suffix()
        ));
        let _ = fs::remove_dir_all(&staging);
        let result = self.pull_prefix(rel, &staging).and_then(|()| {
            match fs::rename(&staging, dest) {
                // Another process on this machine pulled it first; its rename was atomic.
                Err(_) if dest.is_dir() => Ok(()),
                other => other.map_err(|e| CheckpointError::new(dest, e)),
            }
        });
        let _ = fs::remove_dir_all(&staging);
        result
    }

    /// Downloads the objects directly under `rel` into the folder `dest`.
    fn pull_prefix(&self, rel: &str, dest: &Path) -> Result<(), CheckpointError> {
        let prefix = self.path(rel);
        let store = self.root.store.clone();
        let listed =
            runtime::block_on(async move { store.list_with_delimiter(Some(&prefix)).await })
                .map_err(|e| self.error(rel, e))?;
        fs::create_dir_all(dest).map_err(|e| CheckpointError::new(dest, e))?;
        for meta in listed.objects {
            let name = meta.location.filename().unwrap_or_default().to_string();
            self.pull_file(&format!("{rel}/{name}"), &dest.join(&name))?;
        }
        Ok(())
    }

    /// Downloads one object to `dest` through a temporary file; a missing object is skipped.
    fn pull_file(&self, rel: &str, dest: &Path) -> Result<(), CheckpointError> {
        let path = self.path(rel);
        let store = self.root.store.clone();
        let tmp = dest.with_extension(format!("partial-{}", unique_suffix()));
        let got = runtime::block_on(get_file(store.as_ref(), &path, &tmp));
        match got {
            Ok(true) => fs::rename(&tmp, dest).map_err(|e| CheckpointError::new(dest, e)),
            Ok(false) => Ok(()),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(self.error(rel, e))
            }
        }
    }
}

/// Uploads `file` to `path`: whole when small, in parts read one at a time when large.
async fn put_file(store: &dyn ObjectStore, path: &StorePath, file: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", file.display());
    let len = fs::metadata(file).map_err(io)?.len() as usize;
    if len <= PART_BYTES {
        let data = fs::read(file).map_err(io)?;
        store
            .put(path, PutPayload::from(data))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let mut upload = store.put_multipart(path).await.map_err(|e| e.to_string())?;
    let sent = async {
        let mut f = fs::File::open(file).map_err(io)?;
        loop {
            let mut part = Vec::with_capacity(PART_BYTES);
            (&mut f)
                .take(PART_BYTES as u64)
                .read_to_end(&mut part)
                .map_err(io)?;
            if part.is_empty() {
                break;
            }
            upload
                .put_part(PutPayload::from(part))
                .await
                .map_err(|e| e.to_string())?;
        }
        upload.complete().await.map(drop).map_err(|e| e.to_string())
    }
    .await;
    if sent.is_err() && upload.abort().await.is_err() {
        tracing::warn!(path = %path, "could not abort a failed multipart upload");
    }
    sent
}

/// Streams the object at `path` into `file`; `Ok(false)` when there is no such object.
async fn get_file(store: &dyn ObjectStore, path: &StorePath, file: &Path) -> Result<bool, String> {
    let got = match store.get(path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.to_string()),
    };
    let io = |e: std::io::Error| format!("{}: {e}", file.display());
    let mut f = fs::File::create(file).map_err(io)?;
    let mut chunks = got.into_stream();
    while let Some(chunk) = chunks.next().await {
        f.write_all(&chunk.map_err(|e| e.to_string())?)
            .map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    Ok(true)
}

/// The files directly in `dir`, sorted.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| CheckpointError::new(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned()
}

/// A run's side of its object-store copy, if it has one (without, every call does nothing).
/// Checkpoints go up in the background, one at a time, while training goes on: call
/// [`Uploader::wait`] before the run folder changes again (the next checkpoint,
/// `metrics.csv`); it returns the upload's error, if any.
#[derive(Debug)]
pub struct Uploader {
    mirror: Option<RunMirror>,
    pending: Option<std::thread::JoinHandle<Result<(), CheckpointError>>>,
}

impl Uploader {
    /// An uploader to `mirror` (none: nothing is uploaded).
    pub fn new(mirror: Option<RunMirror>) -> Self {
        Self {
            mirror,
            pending: None,
        }
    }

    /// The copy it uploads to.
    pub fn mirror(&self) -> Option<&RunMirror> {
        self.mirror.as_ref()
    }

    /// Waits for the upload in flight, if any.
    pub fn wait(&mut self) -> Result<(), CheckpointError> {
        let Some(handle) = self.pending.take() else {
            return Ok(());
        };
        handle.join().unwrap_or_else(|_| {
            let url = self.mirror.as_ref().map_or("", RunMirror::url);
            Err(CheckpointError::new(url, "upload thread panicked"))
        })
    }

    /// Starts uploading checkpoint `dir` of the run folder `out` (after the previous upload).
    pub fn push_checkpoint(&mut self, out: &Path, dir: &Path) -> Result<(), CheckpointError> {
        self.wait()?;
        let Some(mirror) = self.mirror.clone() else {
            return Ok(());
        };
        let url = mirror.url().to_string();
        let (out, dir) = (out.to_path_buf(), dir.to_path_buf());
        let handle = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || mirror.push_checkpoint(&out, &dir))
            .map_err(|e| CheckpointError::new(url, e))?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Claims the copy for the run folder's attempt at once (see [`RunMirror::claim`]).
    pub fn claim(&self, out: &Path) -> Result<(), CheckpointError> {
        self.mirror.as_ref().map_or(Ok(()), |m| m.claim(out))
    }

    /// Uploads the run-relative file `rel` at once (a rank's data position).
    pub fn push_file(&self, out: &Path, rel: &str) -> Result<(), CheckpointError> {
        self.mirror
            .as_ref()
            .map_or(Ok(()), |m| m.push_file(out, rel))
    }

    /// After the upload in flight, the finished run's outputs ([`RunMirror::push_outputs`]).
    pub fn push_outputs(&mut self, out: &Path) -> Result<(), CheckpointError> {
        self.wait()?;
        self.mirror.as_ref().map_or(Ok(()), |m| m.push_outputs(out))
    }
}

/// Opens the copy at `url` (if any) for a run in `out`: when resuming, pulls its latest
/// checkpoint into `out`; otherwise refuses a copy that holds a run already, as a run folder
/// with checkpoints is refused.
pub fn prepare(url: Option<&str>, out: &Path, resume: bool) -> Result<Uploader, CheckpointError> {
    let Some(url) = url else {
        return Ok(Uploader::new(None));
    };
    let mirror = RunMirror::open(url)?;
    if resume {
        mirror.pull(out)?;
    } else if mirror.latest()?.is_some() {
        return Err(CheckpointError::new(
            url,
            "holds a run already: pass --resume to continue it, or choose another --checkpoint-url",
        ));
    }
    Ok(Uploader::new(Some(mirror)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder holding checkpoint `name` with one payload file.
    fn run_with_checkpoint(out: &Path, name: &str, payload: &[u8]) -> PathBuf {
        let dir = out.join("checkpoints").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("model.bpk"), payload).unwrap();
        fs::write(out.join("checkpoints").join(LATEST), name).unwrap();
        fs::write(out.join("metrics.csv"), "step\n1\n").unwrap();
        dir
    }

    /// A remote `latest` naming a path outside the run (`../x`) is refused, naming the
    /// pointer, and nothing is pulled.
    #[test]
    fn a_forged_remote_latest_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("remote");
        fs::create_dir_all(remote.join("checkpoints")).unwrap();
        let mirror = RunMirror::open(&remote.to_string_lossy()).unwrap();
        for forged in ["../x", "ckpt-1/../../etc", "/etc", "ckpt-", "latest"] {
            fs::write(remote.join("checkpoints").join(LATEST), forged).unwrap();
            let e = mirror.latest().unwrap_err().to_string();
            assert!(
                e.contains("checkpoints/latest") && e.contains("not a checkpoint"),
                "{e}"
            );
            let out = tmp.path().join("out");
            assert!(mirror.pull(&out).is_err());
            assert!(!tmp.path().join("x").exists() && !out.join("checkpoints").exists());
        }
    }

    /// Two machines' rank 0 share a copy: once attempt 2 has claimed it, attempt 1 (cut off,
    /// still training on its own machine) uploads nothing and `latest` stays attempt 2's.
    #[test]
    fn a_stale_attempt_is_fenced_out_of_the_object_store_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = RunMirror::open(&tmp.path().join("remote").to_string_lossy()).unwrap();
        let (old, new) = (tmp.path().join("machine-a"), tmp.path().join("machine-b"));
        checkpoint::claim(&old.join("checkpoints"), 1).unwrap();
        let first = run_with_checkpoint(&old, "ckpt-00000002", b"a");
        remote.push_checkpoint(&old, &first).unwrap();
        checkpoint::claim(&new.join("checkpoints"), 2).unwrap();
        let theirs = run_with_checkpoint(&new, "ckpt-00000004", b"b");
        remote.claim(&new).unwrap();
        remote.push_checkpoint(&new, &theirs).unwrap();
        let stale = run_with_checkpoint(&old, "ckpt-00000006", b"a");
        let e = remote
            .push_checkpoint(&old, &stale)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attempt 1 is stale: attempt 2 holds this run"),
            "{e}"
        );
        assert_eq!(remote.latest().unwrap().as_deref(), Some("ckpt-00000004"));
        assert!(!tmp.path().join("remote/checkpoints/ckpt-00000006").exists());
        assert!(
            remote.claim(&old).is_err(),
            "the old attempt cannot take it back"
        );
    }

    #[test]
    fn a_background_upload_is_pulled_back_whole_into_an_empty_run_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let dir = run_with_checkpoint(&out, "ckpt-00000001", &[7u8; 100_000]);
        let remote = tmp.path().join("remote");
        let mut uploader = Uploader::new(Some(RunMirror::open(&remote.to_string_lossy()).unwrap()));
        uploader.push_checkpoint(&out, &dir).unwrap();
        uploader.wait().unwrap();
        assert_eq!(
            uploader.mirror().unwrap().latest().unwrap().as_deref(),
            Some("ckpt-00000001")
        );

        let elsewhere = tmp.path().join("elsewhere");
        assert!(uploader.mirror().unwrap().pull(&elsewhere).unwrap());
        let pulled = elsewhere.join("checkpoints/ckpt-00000001/model.bpk");
        assert_eq!(fs::read(pulled).unwrap(), vec![7u8; 100_000]);
        assert_eq!(
            fs::read_to_string(elsewhere.join("metrics.csv")).unwrap(),
            "step\n1\n"
        );
        let leftovers: Vec<_> = fs::read_dir(elsewhere.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("pulling") || n.contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// On a real Azure Blob server (Azurite): the newest checkpoint is named in `latest`,
    /// a checkpoint the local folder pruned is deleted from the copy, and an empty run folder
    /// gets the newest one back.
    #[test]
    fn checkpoints_kept_in_azure_blob_storage_are_pruned_and_pulled_back() {
        taming_tests::azure::azurite();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let mirror = RunMirror::open(&taming_tests::azure::url("mirror-run")).unwrap();
        let first = run_with_checkpoint(&out, "ckpt-00000001", &[1u8; 1000]);
        mirror.push_checkpoint(&out, &first).unwrap();
        fs::remove_dir_all(&first).unwrap();
        let second = run_with_checkpoint(&out, "ckpt-00000002", &[2u8; 1000]);
        mirror.push_checkpoint(&out, &second).unwrap();
        assert_eq!(mirror.latest().unwrap().as_deref(), Some("ckpt-00000002"));

        let elsewhere = tmp.path().join("elsewhere");
        assert!(mirror.pull(&elsewhere).unwrap());
        let pulled = elsewhere.join("checkpoints/ckpt-00000002/model.bpk");
        assert_eq!(fs::read(pulled).unwrap(), vec![2u8; 1000]);
        let (store, pruned) = (
            mirror.root.store.clone(),
            mirror.path("checkpoints/ckpt-00000001"),
        );
        let listed =
            runtime::block_on(async move { store.list(Some(&pruned)).collect::<Vec<_>>().await });
        assert!(
            listed.is_empty(),
            "the pruned checkpoint is deleted: {listed:?}"
        );
    }

    #[test]
    fn a_failed_background_upload_is_reported_by_wait_naming_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let dir = run_with_checkpoint(&out, "ckpt-00000002", b"x");
        // A copy below a regular file cannot be written.
        let blocker = tmp.path().join("not-a-folder");
        fs::write(&blocker, b"").unwrap();
        let url = blocker.join("copy").to_string_lossy().into_owned();
        let mut uploader = Uploader::new(Some(RunMirror::open(&url).unwrap()));
        uploader.push_checkpoint(&out, &dir).unwrap();
        let err = uploader.wait().unwrap_err().to_string();
        assert!(err.contains("not-a-folder/copy"), "{err}");
        assert!(uploader.wait().is_ok(), "reported once");
    }
}
