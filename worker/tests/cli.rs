//! The `worker` binary: decoding batches ahead (`--prefetch`) changes when batches are made,
//! not which ones a run trains on; a device the build lacks is refused before any work;
//! `--threads` sizes the compute pool; a run killed while it copies a checkpoint to object
//! storage leaves the previous one named and whole, and resumes from it elsewhere.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_same, exported_params};
use taming_tests::process::{bin, succeed, tiny_config};

fn train(config: &Path, out: &Path, prefetch: &str) {
    succeed(
        Command::new(bin("worker"))
            .args(["--prefetch", prefetch])
            .args(["train", "--stage", "vqgan", "--steps", "4", "--quiet"])
            .args(["--eval-every", "4", "--checkpoint-every", "4"])
            .arg("--config")
            .arg(config)
            .arg("--out")
            .arg(out),
    );
}

#[test]
fn runs_with_and_without_batches_made_ahead_train_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let (inline, ahead) = (tmp.path().join("inline"), tmp.path().join("ahead"));
    train(&config, &inline, "0");
    train(&config, &ahead, "3");
    assert_same(&exported_params(&ahead), &exported_params(&inline));
}

/// `--device` naming a GPU backend this build was compiled without: one error naming the
/// device and the cargo feature to rebuild with, exit 1, no run folder.
#[cfg(not(any(feature = "cuda", feature = "vulkan")))]
#[test]
fn a_device_this_build_lacks_is_refused_naming_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    for (device, feature) in [
        ("cuda:0", "--features cuda"),
        ("vulkan:1", "--features vulkan"),
    ] {
        let out = tmp.path().join(device.replace(':', "-"));
        let run = Command::new(bin("worker"))
            .args(["train", "--steps", "1", "--device", device, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(device) && stderr.contains(feature),
            "{stderr}"
        );
        assert!(!out.exists(), "{device}: nothing written");
    }
}

/// The names of a process's threads.
#[cfg(target_os = "linux")]
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// A worker waiting for its coordinator already has its compute pool: `--threads 3` gives
/// three threads named compute-0 to compute-2.
#[cfg(target_os = "linux")]
#[test]
fn threads_sets_the_size_of_the_named_compute_pool() {
    let worker = taming_tests::process::Proc(
        Command::new(bin("worker"))
            .args(["--threads", "3", "--coordinator", "127.0.0.1:9"])
            .env("TAMING_CLUSTER_TOKEN", "t")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = worker.0.id();
    let mut compute = Vec::new();
    taming_tests::process::wait_for(
        "the compute pool",
        std::time::Duration::from_secs(20),
        || {
            compute = thread_names(pid)
                .into_iter()
                .filter(|n| n.starts_with("compute-"))
                .collect();
            compute.len() >= 3
        },
    );
    compute.sort();
    assert_eq!(compute, ["compute-0", "compute-1", "compute-2"]);
}

/// `worker train` keeping its checkpoints in a `file://` object store, for `steps`; `extra`
/// flags and environment as given.
fn train_mirrored(config: &Path, out: &Path, url: &str, steps: &str) -> Command {
    let mut cmd = Command::new(bin("worker"));
    cmd.args(["train", "--stage", "vqgan", "--quiet", "--steps", steps])
        .args(["--eval-every", "2", "--checkpoint-every", "2"])
        .args(["--checkpoint-url", url])
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out);
    cmd
}

/// A process killed while it uploads the checkpoint of step 4 (its files sent, `latest` not
/// yet): the copy still names step 2's checkpoint, whole, and a run elsewhere resumes from
/// it with one continuous step count.
#[test]
fn a_run_killed_mid_upload_leaves_the_previous_checkpoint_named_and_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let copy = tmp.path().join("copy");
    let url = format!("file://{}", copy.display());
    let killed = train_mirrored(&config, &tmp.path().join("first"), &url, "6")
        .env("TAMING_FAILPOINT", "abort-in-upload:4")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&killed.stderr);
    assert!(!killed.status.success(), "{stderr}");
    assert!(stderr.contains("aborting in the upload"), "{stderr}");
    let latest = std::fs::read_to_string(copy.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "ckpt-00000002");
    assert!(
        copy.join("checkpoints/ckpt-00000004/model.bpk").is_file(),
        "step 4's files were sent before the abort"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(copy.join("checkpoints/ckpt-00000002/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 2);
    let elsewhere = tmp.path().join("elsewhere");
    succeed(train_mirrored(&config, &elsewhere, &url, "6").arg("--resume"));
    let csv = std::fs::read_to_string(elsewhere.join("metrics.csv")).unwrap();
    assert_eq!(
        taming_tests::process::csv_text_steps(&csv),
        [1, 2, 3, 4, 5, 6],
        "resumed from step 2"
    );
    let latest = std::fs::read_to_string(copy.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "ckpt-00000006");
}
