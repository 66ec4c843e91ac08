//! The `worker` binary: decoding batches ahead (`--prefetch`) changes when batches are made,
//! not which ones a run trains on.

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
