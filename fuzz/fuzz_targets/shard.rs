//! A shard of arbitrary bytes through the loader, as a dataloader service or a worker reads
//! one: tar entries, sample grouping, image and label-map decoding with their size checks.
//! Every input ends in batches, skipped samples or an error naming the shard.
#![no_main]

use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ShardLoader};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let shard = dir.path().join("train-000000.tar");
    std::fs::write(&shard, data).expect("writing the shard");
    let pre = Preprocess {
        size: 16,
        random_crop: true,
        flip: true,
    };
    let mut cfg = LoaderConfig::simple(2, pre, 0, true);
    cfg.require_masks = data.first().is_some_and(|b| b & 1 == 1);
    let shards = [shard.to_string_lossy().into_owned()];
    let Ok(mut loader) = ShardLoader::open(&shards, cfg, &LoaderState::default()) else {
        return;
    };
    for _ in 0..8 {
        match loader.next_in_epoch() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
