//! The shard loader on the embedded Fashion-MNIST shards and on hand-made bad shards.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{data_dir, png, png_from};
use taming_dataloader::reader::SampleReader;
use taming_dataloader::shards::list_split;
use taming_dataloader::source::locate;
use taming_dataloader::{
    DataError, ImageBatch, LoaderConfig, LoaderState, Preprocess, ShardLoader,
};

fn config(batch_size: usize, train: bool) -> LoaderConfig {
    common::crops(batch_size, train, 7)
}

fn open(shards: &[String], cfg: LoaderConfig, state: &LoaderState) -> ShardLoader {
    ShardLoader::open(shards, cfg, state).unwrap()
}

#[test]
fn validation_pass_reads_every_sample_once_with_labels() {
    let shards = list_split(data_dir(), "val").unwrap();
    let mut loader = open(&shards, config(64, false), &LoaderState::default());
    let mut keys = HashSet::new();
    let mut labels = HashSet::new();
    while let Some(batch) = loader.next_in_epoch().unwrap() {
        assert_eq!(batch.shape[1..], [3, 32, 32]);
        assert_eq!(batch.images.len(), batch.shape.iter().product::<usize>());
        assert!(batch.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        for (k, l) in batch.keys.iter().zip(&batch.labels) {
            assert!(keys.insert(k.clone()), "{k} twice");
            labels.insert(l.expect("label"));
        }
    }
    assert_eq!(keys.len(), 500);
    assert_eq!(labels.len(), 10, "all ten classes: {labels:?}");
}

/// The second embedded set: 64x64 crops of six public-domain and CC0 photos, as JPEG, without
/// labels or label maps.
#[test]
fn photo_crops_are_64_pixel_jpeg_samples_of_six_photos() {
    let dir = data_dir().join("../photo-crops");
    for (split, count) in [("train", 1200), ("val", 120)] {
        let shards = list_split(&dir, split).unwrap();
        let cfg = LoaderConfig::simple(
            100,
            Preprocess {
                size: 64,
                random_crop: false,
                flip: false,
            },
            7,
            false,
        );
        let mut loader = open(&shards, cfg, &LoaderState::default());
        let (mut keys, mut photos) = (HashSet::new(), HashSet::new());
        while let Some(batch) = loader.next_in_epoch().unwrap() {
            assert_eq!(batch.shape[1..], [3, 64, 64]);
            assert!(batch.masks.is_none() && batch.labels.iter().all(Option::is_none));
            let spread = batch
                .images
                .iter()
                .fold((1f32, -1f32), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            assert!(
                spread.0 < -0.5 && spread.1 > 0.5,
                "real photo contrast: {spread:?}"
            );
            for k in batch.keys {
                photos.insert(k.rsplit_once('-').unwrap().0.to_string());
                assert!(keys.insert(k));
            }
        }
        assert_eq!((split, keys.len(), photos.len()), (split, count, 6));
    }
}

#[test]
fn an_epoch_delivers_every_training_sample_exactly_once_then_reshuffles() {
    let shards = list_split(data_dir(), "train").unwrap();
    let mut loader = open(&shards, config(128, true), &LoaderState::default());
    let mut first = Vec::new();
    while first.len() < 2000 {
        first.extend(loader.next_batch().unwrap().keys);
    }
    let epoch0: HashSet<_> = first[..2000].iter().cloned().collect();
    assert_eq!(epoch0.len(), 2000, "no duplicate within an epoch");
    assert_eq!(loader.state().epoch, 1, "crossed into epoch 1");
    let located = shards.iter().map(|s| locate(s).unwrap()).collect();
    let reader =
        SampleReader::new(located, config(1, true).reader, &LoaderState::default()).unwrap();
    assert_eq!(reader.rank_shards(0).len(), 4);
    assert_ne!(
        reader.rank_shards(0),
        reader.rank_shards(1),
        "shard order differs between epochs"
    );
}

#[test]
fn resuming_from_a_saved_state_continues_with_identical_batches() {
    let shards = list_split(data_dir(), "train").unwrap();
    let mut straight = open(&shards, config(96, true), &LoaderState::default());
    let batches: Vec<_> = (0..8).map(|_| straight.next_batch().unwrap()).collect();
    let saved = batches[2].state.clone();
    let mut resumed = open(&shards, config(96, true), &saved);
    for expected in &batches[3..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!(got.keys, expected.keys);
        assert_eq!(
            got.images, expected.images,
            "same augmentations after resume"
        );
    }
}

fn shard_with(path: &Path, files: &[(&str, &[u8])]) {
    std::fs::write(path, common::tar_bytes(files)).unwrap();
}

#[test]
fn corrupt_images_and_samples_without_image_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let good = png();
    let other = png_from(32, 32, |x, y| [y as u8 * 8, 200, x as u8]);
    shard_with(
        &tmp.path().join("train-000000.tar"),
        &[
            ("a.png", &good),
            ("a.cls", b"3"),
            ("b.png", b"\x89PNG truncated"),
            ("c.cls", b"1"),
            ("d.jpg", &good[..good.len() / 2]),
            ("e.png", &other),
        ],
    );
    let shards = list_split(tmp.path(), "train").unwrap();
    let mut loader = open(&shards, config(8, false), &LoaderState::default());
    let batch = loader.next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys, vec!["a", "e"]);
    assert_eq!(batch.labels, vec![Some(3), None]);
    assert_eq!(loader.skipped(), 3);
    // Each usable image sits in its own place, the skipped ones' places closed up.
    let clean = tempfile::tempdir().unwrap();
    shard_with(
        &clean.path().join("train-000000.tar"),
        &[("a.png", &good), ("e.png", &other)],
    );
    let shards = list_split(clean.path(), "train").unwrap();
    let want = open(&shards, config(8, false), &LoaderState::default())
        .next_in_epoch()
        .unwrap()
        .unwrap();
    assert_eq!(batch.shape, [2, 3, 32, 32]);
    assert_eq!(batch.images, want.images);
}

#[test]
fn byte_batches_are_the_float_batches_before_scaling() {
    let shards = list_split(data_dir(), "train").unwrap();
    let start = LoaderState::default();
    let mut floats = open(&shards, config(48, true), &start);
    let mut bytes = open(&shards, config(48, true), &start);
    for _ in 0..3 {
        let (f, b) = (floats.next_batch().unwrap(), bytes.next_pixels().unwrap());
        assert_eq!(f, ImageBatch::from(b));
    }
}

#[test]
fn a_data_set_without_any_usable_sample_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    shard_with(
        &tmp.path().join("train-000000.tar"),
        &[("x.png", b"garbage")],
    );
    let shards = list_split(tmp.path(), "train").unwrap();
    let mut loader = open(&shards, config(4, true), &LoaderState::default());
    assert!(matches!(
        loader.next_batch(),
        Err(DataError::Empty { skipped: 1 })
    ));
}

#[test]
fn a_directory_without_shards_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = list_split(tmp.path(), "train").unwrap_err().to_string();
    assert!(
        err.contains(&tmp.path().display().to_string()) && err.contains("train-*.tar"),
        "{err}"
    );
}
