//! `coordinator launch` as a user runs it: a short stage-1 job on the embedded data through a
//! real worker process, and the refusals.

use taming_tests::process::{
    bin, children_named, csv_steps, finish_within, root, spawn_announcing, succeed, wait_for,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
}

/// The shared tiny config with the discriminator on from step 2, so that short jobs train it.
fn tiny_config(dir: &Path) -> PathBuf {
    let path = taming_tests::process::tiny_config(dir);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("disc_start: 400", "disc_start: 2")).unwrap();
    path
}

#[test]
fn launch_runs_a_vqgan_job_and_leaves_a_complete_run_folder() {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_coordinator")).with_file_name("worker");
    assert!(
        worker.is_file(),
        "{} missing: run the tests with `cargo test --workspace`",
        worker.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tiny_config(tmp.path());
    let data = root().join("data/fashion-mnist");
    let args = |steps: &str| {
        let mut c = coordinator();
        c.args([
            "launch", "--stage", "vqgan", "--nodes", "1", "--steps", steps,
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out);
        c
    };
    succeed(&mut args("3"));
    let first_rows = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    for file in [
        "metrics.csv",
        "loss.png",
        "val_grid.png",
        "model/config.json",
        "model/model.safetensors",
        "checkpoints/latest",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let again = args("5").output().unwrap();
    assert!(
        !again.status.success(),
        "an existing run is not overwritten without --resume"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    succeed(args("5").arg("--resume"));
    let resumed = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(
        csv_steps(&out.join("metrics.csv")),
        vec![1, 2, 3, 4, 5],
        "one continuous step count"
    );
    assert!(
        resumed.starts_with(&first_rows),
        "the first run's rows are kept as they were:\n{first_rows}\n{resumed}"
    );
    // The loss curve continues as an uninterrupted run's would.
    let straight = tmp.path().join("straight");
    succeed(
        coordinator()
            .args(["launch", "--stage", "vqgan", "--nodes", "1", "--steps", "5"])
            .arg("--config")
            .arg(&cfg)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&straight),
    );
    let l1 = |run: &Path| csv_column(&run.join("metrics.csv"), "l1");
    let (ours, theirs) = (l1(&out), l1(&straight));
    assert_eq!(ours.len(), 5);
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "step {}: l1 {a} resumed, {b} uninterrupted",
            step + 1
        );
    }
}

/// The values of `column` in a metrics.csv, row by row.
fn csv_column(path: &Path, column: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == column).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_config_with_an_unknown_key_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.yaml");
    let text = std::fs::read_to_string(root().join("configs/stage1/fashion_mnist.yaml")).unwrap();
    std::fs::write(
        &cfg,
        text.replace("batch_size: 16", "batch_size: 16\nbatch_sise: 8"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let run = coordinator()
        .args(["launch", "--stage", "vqgan", "--steps", "2"])
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("batch_sise") && err.contains("bad.yaml"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
}

#[test]
fn stage_two_without_a_vqgan_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = coordinator()
        .args(["launch", "--stage", "transformer", "--nodes", "1"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("--stage transformer needs --vqgan"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// A small stage-2 config so that the job takes seconds.
fn tiny_stage2_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("configs/stage2/fashion_mnist.yaml")).unwrap();
    let text = text
        .replace("n_layer: 4", "n_layer: 1")
        .replace("n_embd: 128", "n_embd: 32")
        .replace("batch_size: 32", "batch_size: 8");
    let path = dir.join("tiny2.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `launch --nodes 1 --nproc-per-node 2`: one local worker process that runs two local ranks
/// (`worker --nproc-per-node 2`), and the job has both.
#[test]
fn one_node_with_two_local_ranks_runs_a_two_rank_job() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = succeed(
        coordinator()
            .args("launch --stage vqgan --nodes 1 --nproc-per-node 2 --steps 3".split_whitespace())
            .args(["--quiet", "--dataloaders", "0", "--eval-every", "3"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--out")
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("succeeded") && stdout.contains("on 2 worker(s)"),
        "{stdout}"
    );
    assert_eq!(csv_steps(&out.join("metrics.csv")), vec![1, 2, 3]);
    let log = std::fs::read_to_string(out.join("logs/worker-0.log")).unwrap();
    for said in [
        "local rank 0: local-0-0",
        "local rank 1: local-0-1",
        "rank=1",
    ] {
        assert!(log.contains(said), "{said} missing from:\n{log}");
    }
    assert!(
        !out.join("logs/worker-1.log").exists(),
        "one worker process"
    );
    let refused = coordinator()
        .args(
            "launch --stage vqgan --nproc-per-node 2 --coordinator 127.0.0.1:9".split_whitespace(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--nproc-per-node is for the local mini-cluster"),
        "{err}"
    );
}

/// Stage 1 on two nodes through the dataloader service, then stage 2 (class-conditional, on
/// codes the workers encode with the new VQGAN) on two nodes over the same mini-cluster.
#[test]
fn two_nodes_on_the_local_mini_cluster_train_both_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = succeed(
        coordinator()
            .args("launch --stage vqgan --nodes 2 --steps 4 --quiet".split_whitespace())
            .args(["--eval-every", "2", "--checkpoint-every", "2"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--out")
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("succeeded")
            && stdout.contains("on 2 worker(s)")
            && stdout.contains(" img/s |"),
        "{stdout}"
    );
    for file in [
        "metrics.csv",
        "loss.png",
        "val_grid.png",
        "model/model.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let log = std::fs::read_to_string(out.join("logs/worker-0.log")).unwrap()
        + &std::fs::read_to_string(out.join("logs/worker-1.log")).unwrap();
    assert!(log.contains("rank=0") && log.contains("rank=1"), "{log}");
    assert!(
        out.join("loader").read_dir().unwrap().next().is_some(),
        "rank 1 saved its data position at the checkpoint"
    );

    let out2 = tmp.path().join("transformer");
    let run = succeed(
        coordinator()
            .args("launch --stage transformer --nodes 2 --steps 4 --quiet".split_whitespace())
            .args("--cond class --eval-every 2 --checkpoint-every 2".split_whitespace())
            .arg("--vqgan")
            .arg(out.join("model"))
            .arg("--config")
            .arg(tiny_stage2_config(tmp.path()))
            .arg("--out")
            .arg(&out2),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("succeeded")
            && stdout.contains("on 2 worker(s)")
            && stdout.contains("loss")
            && stdout.contains(" tokens/s |"),
        "{stdout}"
    );
    for file in [
        "metrics.csv",
        "samples.png",
        "model/model.safetensors",
        "checkpoints/latest",
    ] {
        assert!(out2.join(file).is_file(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(out2.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 5, "{metrics}");
}

#[test]
fn an_output_folder_that_cannot_be_created_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, "a file where the run folder's parent should be").unwrap();
    let out = blocker.join("run");
    let run = coordinator()
        .args(["launch", "--stage", "vqgan", "--steps", "2"])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--data")
        .arg(root().join("data/fashion-mnist"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("not-a-dir"), "{err}");
}

fn launch_ok(args: &mut Command) -> String {
    let run = succeed(args);
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// The segmentation-conditioned default end to end: the image VQGAN and the cond stage (the
/// segmentation objective on the embedded silhouette maps), codes of both through
/// `dataloader precompute-codes`, then the transformer on two nodes with `--cond
/// segmentation`.
#[test]
fn segmentation_conditioning_runs_through_the_whole_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("data/fashion-mnist");
    let small = |name: &str, from: &str| {
        let text = std::fs::read_to_string(root().join(from)).unwrap();
        let text = text.replace("batch_size: 16", "batch_size: 4").replace(
            "kmeans_init: {iters: 10, batches: 2}",
            "kmeans_init: {iters: 3, batches: 1}",
        );
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let stage1 = |config: PathBuf, out: &Path| {
        launch_ok(
            coordinator()
                .args("launch --stage vqgan --nodes 1 --steps 2 --quiet".split_whitespace())
                .arg("--config")
                .arg(config)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(out),
        );
    };
    let (image, seg) = (tmp.path().join("image"), tmp.path().join("seg"));
    stage1(
        small("image.yaml", "configs/stage1/fashion_mnist.yaml"),
        &image,
    );
    stage1(
        small("seg.yaml", "configs/stage1/fashion_mnist_seg.yaml"),
        &seg,
    );
    let codes = tmp.path().join("codes");
    launch_ok(
        Command::new(bin("dataloader"))
            .args(["precompute-codes", "--batch", "32"])
            .arg("--vqgan")
            .arg(image.join("model"))
            .arg("--cond-vqgan")
            .arg(seg.join("model"))
            .arg("--data")
            .arg(data.join("train-000000.tar"))
            .arg("--out")
            .arg(&codes),
    );
    assert!(codes.join("_manifest.json").is_file());
    let out = tmp.path().join("transformer");
    let stdout = launch_ok(
        coordinator()
            .args("launch --stage transformer --nodes 2 --steps 3 --quiet".split_whitespace())
            .args(["--cond", "segmentation", "--eval-every", "3"])
            .arg("--vqgan")
            .arg(image.join("model"))
            .arg("--cond-vqgan")
            .arg(seg.join("model"))
            .arg("--codes")
            .arg(&codes)
            .arg("--config")
            .arg(tiny_stage2_config(tmp.path()))
            .arg("--out")
            .arg(&out),
    );
    assert!(
        stdout.contains("succeeded") && stdout.contains("on 2 worker(s)"),
        "{stdout}"
    );
    let config = std::fs::read_to_string(out.join("model/config.json")).unwrap();
    assert!(
        config.contains("\"segmentation\"") && config.contains("\"classes\": 11"),
        "{config}"
    );
    assert!(out.join("samples.png").is_file());
}

/// A one-node local launch whose worker is killed by a signal after its first checkpoint:
/// the mini-cluster starts the worker again, the job resumes, and the run ends with one
/// continuous step count; launch says how the first attempt ended.
#[test]
fn a_killed_local_worker_is_restarted_and_the_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let launch = coordinator()
        .args(
            "launch --stage vqgan --nodes 1 --steps 24 --quiet --dataloaders 0".split_whitespace(),
        )
        .args(["--checkpoint-every", "3", "--eval-every", "12"])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a checkpoint", Duration::from_secs(240), || {
        out.join("checkpoints/latest").exists()
    });
    let workers = children_named(launch.id(), "worker");
    assert_eq!(workers.len(), 1, "one worker process: {workers:?}");
    let killed = Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let run = finish_within(launch, Duration::from_secs(400));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "attempt 1: worker local-0 (pid {}) was killed by signal 9 (SIGKILL)",
            workers[0]
        )),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("succeeded attempt 2"), "{stdout}");
    assert_eq!(
        csv_steps(&out.join("metrics.csv")),
        (1..=24).collect::<Vec<_>>(),
        "one continuous step count"
    );
}

/// A deterministic failure (the test failpoint panics at step 3 of every attempt) fails the
/// job after --max-restarts restarts, with the panic's message shown by launch.
#[test]
fn a_failure_that_repeats_fails_the_job_after_its_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let launch = coordinator()
        .args("launch --stage vqgan --nodes 1 --steps 6 --quiet --dataloaders 0".split_whitespace())
        .args([
            "--max-restarts",
            "1",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "6",
        ])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--out")
        .arg(&out)
        .env("TAMING_FAILPOINT", "panic-at-step:3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = finish_within(launch, Duration::from_secs(400));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    let injected = "injected failure at step 3 (TAMING_FAILPOINT)";
    assert!(
        stderr.contains("attempt 1: rank 0 failed: panicked at") && stderr.contains(injected),
        "the first attempt's end is shown: {stderr}"
    );
    assert!(
        stderr.contains("failed after 1 restart(s): rank 0 failed: panicked at"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(out.join("logs/worker-0.log")).unwrap();
    let panics = log
        .lines()
        .filter(|l| {
            l.starts_with("thread 'main'") && l.contains("panicked at worker/src/failpoint.rs")
        })
        .count();
    assert_eq!(
        panics, 2,
        "two attempts, each on a fresh worker process: {log}"
    );
}

/// A job no worker can take fails after --placement-timeout, saying what it waited for.
#[test]
fn a_job_that_cannot_be_placed_fails_after_the_placement_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args(["serve", "--bind", "127.0.0.1:0", "--state"])
            .arg(tmp.path().join("state"))
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    let run = coordinator()
        .args(
            "launch --stage vqgan --nodes 2 --steps 2 --quiet --placement-timeout 2"
                .split_whitespace(),
        )
        .args(["--coordinator", &said[0]])
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(
            "not placed within 2 s: waiting for 2 idle worker(s) with a cpu device; 0 idle"
        ),
        "{err}"
    );
}

/// Two ranks on the test device (`TAMING_TEST_DEVICE`: Mesa's lavapipe through wgpu in CI),
/// both on its one adapter: the local mini-cluster gives the workers the device, the job is
/// placed on it, and gradients are staged to the host for the ring all-reduce. The run ends
/// with finite losses and the model exported. Skips (or fails with TAMING_REQUIRE_DEVICE=1)
/// without a device.
#[test]
fn two_nodes_train_on_the_test_device() {
    let device = std::env::var("TAMING_TEST_DEVICE").unwrap_or_default();
    let kind = device.split(':').next().unwrap_or_default().to_string();
    if !matches!(kind.as_str(), "wgpu" | "vulkan" | "cuda") {
        let why = format!("TAMING_TEST_DEVICE is `{device}`, not a GPU device");
        assert!(
            std::env::var("TAMING_REQUIRE_DEVICE").as_deref() != Ok("1"),
            "{why} (TAMING_REQUIRE_DEVICE=1)"
        );
        eprintln!("skipped two_nodes_train_on_the_test_device: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path());
    // Validation on a software GPU: 8 images, not the whole split.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\nval_images: 8\n")).unwrap();
    let out = tmp.path().join("run");
    let run = coordinator()
        .args("launch --stage vqgan --nodes 2 --steps 2 --quiet --dataloaders 0".split_whitespace())
        .args([
            "--eval-every",
            "2",
            "--checkpoint-every",
            "2",
            "--device",
            &kind,
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--data")
        .arg(root().join("data/fashion-mnist"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let logs =
        |name: &str| std::fs::read_to_string(out.join("logs").join(name)).unwrap_or_default();
    assert!(
        run.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        logs("worker-0.log"),
        logs("worker-1.log")
    );
    assert_eq!(csv_steps(&out.join("metrics.csv")), vec![1, 2]);
    for l1 in csv_column(&out.join("metrics.csv"), "l1") {
        assert!(l1.is_finite() && l1 > 0.0, "l1 {l1}");
    }
    assert!(out.join("model/model.safetensors").is_file());
    for worker in ["worker-0.log", "worker-1.log"] {
        let log = logs(worker);
        assert!(
            log.lines()
                .any(|l| l.contains("training device") && l.contains(&format!("{kind}:"))),
            "{worker}: not on the device: {log}"
        );
    }
}
