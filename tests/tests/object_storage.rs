//! The system on object storage (a real S3 server, moto): a local mini-cluster (coordinator,
//! two workers, two dataloader services) trains stage 1 from shards in S3 with its
//! checkpoints kept in S3, a second launch with an empty run folder (another machine)
//! resumes from them, and the trained VQGAN precomputes code Parquet into S3.

use std::path::Path;
use std::process::{Command, Output};

use taming_dataloader::codes;
use taming_tests::process::{bin, csv_text_steps, root, succeed, tiny_config};
use taming_tests::s3::{aws_env, s3, upload_dir, url};

fn launch(out: &Path, config: &Path, steps: u64, checkpoints: &str, resume: bool) -> Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.envs(aws_env())
        .args("launch --stage vqgan --nodes 2 --dataloaders 2".split_whitespace())
        .args(["--eval-every", "2", "--checkpoint-every", "2", "--quiet"])
        .args([
            "--steps",
            &steps.to_string(),
            "--checkpoint-url",
            checkpoints,
        ])
        .arg("--data")
        .arg(url("cluster"))
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out);
    if resume {
        cmd.arg("--resume");
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn remote(key: &str) -> Option<String> {
    codes::download(&url(key)).ok().map(|b| text(&b))
}

#[test]
fn a_mini_cluster_trains_from_s3_resumes_from_checkpoints_in_s3_and_precomputes_codes() {
    s3();
    upload_dir(&root().join("data/fashion-mnist"), "cluster");
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let checkpoints = url("cluster-run");
    let out = tmp.path().join("run");
    let run = launch(&out, &config, 4, &checkpoints, false);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("on 2 worker(s)"));
    for f in [
        "model/model.safetensors",
        "logs/dataloader-0.log",
        "logs/dataloader-1.log",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        remote("cluster-run/checkpoints/latest").as_deref(),
        Some("ckpt-00000004")
    );
    let state: serde_json::Value =
        serde_json::from_str(&remote("cluster-run/checkpoints/ckpt-00000004/state.json").unwrap())
            .unwrap();
    assert_eq!(state["step"], 4);
    assert!(remote("cluster-run/checkpoints/ckpt-00000004/model.bpk").is_some());
    assert_eq!(
        csv_text_steps(&remote("cluster-run/metrics.csv").unwrap()),
        [1, 2, 3, 4]
    );

    // The same checkpoint URL without --resume is refused, naming it.
    let again = launch(&tmp.path().join("other"), &config, 4, &checkpoints, false);
    assert!(!again.status.success());
    let why = text(&again.stderr) + &text(&again.stdout);
    assert!(
        why.contains("cluster-run") && why.contains("holds a run already"),
        "{why}"
    );

    // Another machine: no run folder, only the copy in S3.
    let elsewhere = tmp.path().join("elsewhere");
    let resumed = launch(&elsewhere, &config, 6, &checkpoints, true);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let csv = std::fs::read_to_string(elsewhere.join("metrics.csv")).unwrap();
    assert_eq!(
        csv_text_steps(&csv),
        [1, 2, 3, 4, 5, 6],
        "one continuous step count"
    );
    assert_eq!(
        remote("cluster-run/checkpoints/latest").as_deref(),
        Some("ckpt-00000006")
    );
    assert!(
        remote("cluster-run/checkpoints/ckpt-00000002/state.json").is_none(),
        "pruned like the run folder (two kept)"
    );
    let exported = codes::download(&url("cluster-run/model/model.safetensors")).unwrap();
    let local = std::fs::read(elsewhere.join("model/model.safetensors")).unwrap();
    assert!(exported == local, "the final model is in S3 too");
    assert!(remote("cluster-run/model/config.json").is_some());
    assert!(codes::download(&url("cluster-run/val_grid.png")).is_ok());

    let codes_url = url("cluster-codes");
    succeed(
        Command::new(bin("dataloader"))
            .envs(aws_env())
            .args(["precompute-codes", "--out", &codes_url, "--data"])
            .arg(url("cluster/val-000000.tar"))
            .arg("--vqgan")
            .arg(elsewhere.join("model")),
    );
    let manifest = codes::read_manifest(&codes_url).unwrap();
    assert_eq!(manifest.rows, 500);
    let rows = codes::read_codes(&codes::join(&codes_url, &manifest.files[0].path)).unwrap();
    assert!(
        rows.iter()
            .all(|r| r.codes.len() == (r.height * r.width) as usize && r.height == 16)
    );
}
