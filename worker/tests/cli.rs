//! The `worker` binary: decoding batches ahead (`--prefetch`) changes when batches are made,
//! not which ones a run trains on; a device the build lacks is refused before any work;
//! `--threads` sizes the compute pool.

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
