//! Batches made ahead on a background thread: the same batches, positions and skip counts as
//! the loader's own, a bounded number ahead, and errors passed on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{data_dir, png};
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, DataError, ImageBatch, LoaderConfig, LoaderState, Prefetched, ShardLoader,
};

fn config(batch_size: usize, train: bool) -> LoaderConfig {
    common::crops(batch_size, train, 11)
}

fn loader(dir: &std::path::Path, cfg: LoaderConfig, state: &LoaderState) -> ShardLoader {
    ShardLoader::open(&list_split(dir, "train").unwrap(), cfg, state).unwrap()
}

#[test]
fn prefetched_batches_and_positions_are_the_loaders_own_across_epochs() {
    // 2,000 training samples, batches of 300: the seventh batch crosses into epoch 1.
    let start = LoaderState::default();
    let mut plain = loader(&data_dir(), config(300, true), &start);
    let mut ahead = Prefetched::new(Box::new(loader(&data_dir(), config(300, true), &start)), 2);
    assert_eq!(ahead.state(), plain.state(), "nothing handed out yet");
    for i in 0..8 {
        let (want, got) = (plain.next_batch().unwrap(), ahead.next_batch().unwrap());
        assert_eq!(got.keys, want.keys, "batch {i}");
        assert_eq!(got.images, want.images, "batch {i}: same augmentations");
        assert_eq!(got.state, want.state, "batch {i}");
        assert_eq!(
            ahead.state(),
            want.state,
            "position after batch {i}, not ahead"
        );
    }
    assert_eq!(ahead.state().epoch, 1);
}

#[test]
fn a_position_taken_while_batches_wait_resumes_without_loss_or_repeat() {
    let start = LoaderState::default();
    let mut straight = loader(&data_dir(), config(96, true), &start);
    let batches: Vec<ImageBatch> = (0..6).map(|_| straight.next_batch().unwrap()).collect();
    let mut ahead = Prefetched::new(Box::new(loader(&data_dir(), config(96, true), &start)), 3);
    for _ in 0..2 {
        ahead.next_batch().unwrap();
    }
    // Let the thread fill its queue: the position must still be that after batch 2.
    std::thread::sleep(Duration::from_millis(300));
    let saved = ahead.state();
    drop(ahead);
    let mut resumed = loader(&data_dir(), config(96, true), &saved);
    for expected in &batches[2..] {
        assert_eq!(resumed.next_batch().unwrap().keys, expected.keys);
    }
}

/// The real loader, counting the batches asked of it.
struct Counting {
    inner: ShardLoader,
    made: Arc<AtomicUsize>,
}

impl BatchSource for Counting {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        self.made.fetch_add(1, Ordering::SeqCst);
        self.inner.next_batch()
    }
    fn state(&self) -> LoaderState {
        self.inner.state()
    }
    fn skipped(&self) -> u64 {
        self.inner.skipped()
    }
}

#[test]
fn batches_are_made_ahead_but_no_more_than_the_depth_allows() {
    let made = Arc::new(AtomicUsize::new(0));
    let source = Counting {
        inner: loader(&data_dir(), config(16, true), &LoaderState::default()),
        made: made.clone(),
    };
    let depth = 2;
    let mut ahead = Prefetched::new(Box::new(source), depth);
    ahead.next_batch().unwrap();
    // One handed out, `depth` waiting and one more being made (blocked on the full queue).
    let most = 1 + depth + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while made.load(Ordering::SeqCst) < most && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(made.load(Ordering::SeqCst), most, "made ahead while idle");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        made.load(Ordering::SeqCst),
        most,
        "no further than the depth"
    );
    ahead.next_batch().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while made.load(Ordering::SeqCst) < most + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        made.load(Ordering::SeqCst),
        most + 1,
        "one taken, one more made"
    );
}

fn shard_dir(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("train-000000.tar"),
        common::tar_bytes(files),
    )
    .unwrap();
    tmp
}

#[test]
fn skip_counts_follow_the_batches_handed_out() {
    let good = png();
    let tmp = shard_dir(&[
        ("a.png", &good),
        ("b.png", b"\x89PNG truncated"),
        ("c.png", &good),
        ("d.jpg", &good[..good.len() / 2]),
    ]);
    let start = LoaderState::default();
    let mut plain = loader(tmp.path(), config(6, false), &start);
    let mut ahead = Prefetched::new(Box::new(loader(tmp.path(), config(6, false), &start)), 2);
    for _ in 0..3 {
        let (want, got) = (plain.next_batch().unwrap(), ahead.next_batch().unwrap());
        assert_eq!(got.keys, want.keys);
        assert_eq!(ahead.skipped(), plain.skipped(), "after {:?}", want.keys);
    }
    assert!(plain.skipped() >= 12, "two bad samples per epoch");
}

#[test]
fn the_sources_error_is_passed_on_then_the_end_is_explained() {
    let tmp = shard_dir(&[("x.png", b"garbage")]);
    let source = loader(tmp.path(), config(4, true), &LoaderState::default());
    let mut ahead = Prefetched::new(Box::new(source), 2);
    assert!(matches!(
        ahead.next_batch(),
        Err(DataError::Empty { skipped: 1 })
    ));
    assert_eq!(ahead.skipped(), 1);
    let err = ahead.next_batch().unwrap_err();
    assert!(
        matches!(err, DataError::Prefetch { .. }) && err.to_string().contains("after the error"),
        "{err}"
    );
}

/// A source with a bug.
struct Panicking;

impl BatchSource for Panicking {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        panic!("decoder bug at key k7")
    }
    fn state(&self) -> LoaderState {
        LoaderState::default()
    }
    fn skipped(&self) -> u64 {
        0
    }
}

#[test]
fn a_panic_in_the_producer_becomes_an_error_naming_it() {
    let mut ahead = Prefetched::new(Box::new(Panicking), 1);
    let err = ahead.next_batch().unwrap_err().to_string();
    assert!(err.contains("decoder bug at key k7"), "{err}");
}

#[test]
fn one_epoch_made_ahead_is_the_loaders_epoch_then_none() {
    let start = LoaderState::default();
    let mut plain = loader(&data_dir(), config(96, false), &start);
    let mut ahead = Prefetched::epoch(loader(&data_dir(), config(96, false), &start), 2);
    while let Some(want) = plain.next_in_epoch().unwrap() {
        let got = ahead.next_in_epoch().unwrap().expect("as many batches");
        assert_eq!((&got.keys, &got.images), (&want.keys, &want.images));
        assert_eq!(ahead.state(), want.state);
    }
    assert!(ahead.next_in_epoch().unwrap().is_none(), "the end");
    assert!(ahead.next_in_epoch().unwrap().is_none(), "still the end");
    assert!(
        ahead
            .next_batch()
            .unwrap_err()
            .to_string()
            .contains("epoch has ended")
    );
}
