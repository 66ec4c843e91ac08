//! The S3 server (moto, from `taming-tests`) with the embedded shards and the `dataloader`
//! binary pointed at it, and the inputs the object-store tests share.
// Each test binary uses part of this module.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;

use taming_dataloader::codes::CodeRow;
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

/// Two class folders (`a`, `b`) of four 16x16 PNGs each.
pub fn image_folder(dir: &Path) {
    for class in ["a", "b"] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..4 {
            let img = image::RgbImage::from_pixel(16, 16, image::Rgb([i * 40, 9, 9]));
            img.save(dir.join(format!("{class}/{i}.png"))).unwrap();
        }
    }
}

/// `n` code rows of 256 pseudo-random full-range values each (dictionary encoding cannot
/// shrink them below 4 bytes a value), from `shard`.
pub fn code_rows(n: usize, shard: &str) -> Vec<CodeRow> {
    let mut state = 12345u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as i32
    };
    (0..n)
        .map(|i| CodeRow {
            key: format!("img{i:06}"),
            codes: (0..256).map(|_| next()).collect(),
            height: 16,
            width: 16,
            label: Some(i as i64 % 1000),
            cond_codes: None,
            shard: shard.to_string(),
        })
        .collect()
}
