//! The S3 server (moto, from `taming-tests`) with the embedded shards and the `dataloader`
//! binary pointed at it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub use taming_tests::s3::{aws_env, s3, url};

/// The repository root.
pub fn root() -> PathBuf {
    taming_tests::process::root()
}

/// Uploads the embedded Fashion-MNIST shards under `prefix`; idempotent.
pub fn upload_fashion_mnist(prefix: &str) {
    taming_tests::s3::upload_dir(&root().join("data/fashion-mnist"), prefix);
}

/// The `dataloader` binary with the S3 environment.
pub fn dataloader() -> Command {
    s3();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataloader"));
    cmd.envs(aws_env());
    cmd
}
