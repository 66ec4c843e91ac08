//! Batches made ahead on a background thread: the same batches, positions and skip counts as
//! the loader's own, a bounded number ahead, and errors passed on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The real loader, counting the batches asked of it and checking, as each is asked for,
/// that the consumer's progress allows it: batch `m` may be made only once the consumer has
/// started taking batch `m - depth - 1` (`depth` waiting, one being made).
struct Counting {
    inner: ShardLoader,
    made: Arc<AtomicUsize>,
    /// Batches the consumer has started to take (counted before it asks the queue).
    taken: Arc<AtomicUsize>,
    depth: usize,
    /// Set when a batch was made further ahead than the depth allows.
    overrun: Arc<AtomicBool>,
}

impl Counting {
    fn new(inner: ShardLoader, depth: usize) -> Self {
        Self {
            inner,
            made: Arc::default(),
            taken: Arc::default(),
            depth,
            overrun: Arc::default(),
        }
    }
}

impl BatchSource for Counting {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        let m = self.made.fetch_add(1, Ordering::SeqCst) + 1;
        if m > self.taken.load(Ordering::SeqCst) + self.depth + 1 {
            self.overrun.store(true, Ordering::SeqCst);
        }
        self.inner.next_batch()
    }
    fn state(&self) -> LoaderState {
        self.inner.state()
    }
    fn skipped(&self) -> u64 {
        self.inner.skipped()
    }
}

/// Waits (polling, up to 20 s) until `count` reaches `n`.
fn wait_until(count: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_position_taken_while_batches_wait_resumes_without_loss_or_repeat() {
    let start = LoaderState::default();
    let mut straight = loader(&data_dir(), config(96, true), &start);
    let batches: Vec<ImageBatch> = (0..6).map(|_| straight.next_batch().unwrap()).collect();
    let depth = 3;
    let source = Counting::new(loader(&data_dir(), config(96, true), &start), depth);
    let made = source.made.clone();
    let mut ahead = Prefetched::new(Box::new(source), depth);
    for _ in 0..2 {
        ahead.next_batch().unwrap();
    }
    // The queue full (two taken, `depth` waiting, one being made): the position must still
    // be that after batch 2.
    wait_until(&made, 2 + depth + 1, "the queue to fill");
    let saved = ahead.state();
    drop(ahead);
    let mut resumed = loader(&data_dir(), config(96, true), &saved);
    for expected in &batches[2..] {
        assert_eq!(resumed.next_batch().unwrap().keys, expected.keys);
    }
}

#[test]
fn batches_are_made_ahead_but_no_more_than_the_depth_allows() {
    let depth = 2;
    let source = Counting::new(
        loader(&data_dir(), config(16, true), &LoaderState::default()),
        depth,
    );
    let (made, taken, overrun) = (
        source.made.clone(),
        source.taken.clone(),
        source.overrun.clone(),
    );
    let mut ahead = Prefetched::new(Box::new(source), depth);
    // Made ahead while the consumer is idle: one handed out, `depth` waiting, one more being
    // made (blocked on the full queue).
    taken.fetch_add(1, Ordering::SeqCst);
    ahead.next_batch().unwrap();
    wait_until(&made, 1 + depth + 1, "batches made ahead while idle");
    // Consumed at varying paces, never further ahead than the depth (checked by the source
    // as each batch is asked for, not by timing).
    for i in 0..20 {
        taken.fetch_add(1, Ordering::SeqCst);
        ahead.next_batch().unwrap();
        if i % 3 == 0 {
            wait_until(&made, i + 2 + depth + 1, "the queue to refill");
        }
    }
    assert!(
        !overrun.load(Ordering::SeqCst),
        "a batch was made more than {depth} ahead"
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
