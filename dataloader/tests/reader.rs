//! Splitting across ranks and read slots, the shuffle buffer, and exact resumption, on
//! shards in an in-memory object store.

mod common;

use common::{config, numbered_shards};
use taming_dataloader::{LoaderState, ReaderConfig, ShardLoader};

fn reader(rank: usize, world_size: usize) -> ReaderConfig {
    ReaderConfig {
        rank,
        world_size,
        read_slots: 2,
        shuffle_buffer: 5,
        shuffle_shards: true,
        seed: 9,
    }
}

fn epoch_keys(urls: &[String], cfg: ReaderConfig, epoch: u64) -> Vec<String> {
    let state = LoaderState {
        epoch,
        ..LoaderState::default()
    };
    let mut loader = ShardLoader::open(urls, config(4, cfg), &state).unwrap();
    let mut keys = Vec::new();
    while let Some(b) = loader.next_in_epoch().unwrap() {
        keys.extend(b.keys);
    }
    keys
}

#[test]
fn three_ranks_deliver_every_sample_exactly_once_when_counts_do_not_divide() {
    let counts = [5, 3, 7, 1, 4, 6, 2];
    let urls = numbered_shards("memory://ranks/shards", &counts);
    let mut expected: Vec<String> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| (0..n).map(move |j| format!("s{i}-{j}")))
        .collect();
    expected.sort();
    let mut per_epoch = Vec::new();
    for epoch in 0..2 {
        let per_rank: Vec<Vec<String>> = (0..3)
            .map(|r| epoch_keys(&urls, reader(r, 3), epoch))
            .collect();
        assert!(
            per_rank.iter().all(|k| !k.is_empty()),
            "every rank gets data"
        );
        let mut all: Vec<String> = per_rank.concat();
        all.sort();
        assert_eq!(all, expected, "epoch {epoch}: each sample exactly once");
        per_epoch.push(per_rank);
    }
    assert_ne!(
        per_epoch[0], per_epoch[1],
        "the split changes with the epoch"
    );
}

#[test]
fn the_buffer_shuffles_samples_across_interleaved_shards() {
    let urls = numbered_shards("memory://shuffle/shards", &[6, 6]);
    let plain = ReaderConfig {
        shuffle_buffer: 0,
        read_slots: 1,
        shuffle_shards: false,
        ..reader(0, 1)
    };
    let in_order = epoch_keys(&urls, plain, 0);
    assert_eq!(in_order[..3], ["s0-0", "s0-1", "s0-2"]);
    let interleaved = epoch_keys(
        &urls,
        ReaderConfig {
            read_slots: 2,
            ..plain
        },
        0,
    );
    assert_eq!(interleaved[..4], ["s0-0", "s1-0", "s0-1", "s1-1"]);
    let shuffled = epoch_keys(&urls, reader(0, 1), 0);
    assert_ne!(shuffled, interleaved);
    let mut sorted = shuffled.clone();
    sorted.sort();
    let mut all = in_order.clone();
    all.sort();
    assert_eq!(sorted, all);
}

#[test]
fn resuming_at_any_batch_continues_the_exact_sequence_across_epochs() {
    let urls = numbered_shards("memory://resume/shards", &[5, 3, 7, 4, 6]);
    let cfg = config(
        3,
        ReaderConfig {
            read_slots: 3,
            ..reader(1, 2)
        },
    );
    let mut straight = ShardLoader::open(&urls, cfg, &LoaderState::default()).unwrap();
    let batches: Vec<_> = (0..12).map(|_| straight.next_batch().unwrap()).collect();
    assert!(batches.last().unwrap().state.epoch >= 1, "crosses an epoch");
    for cut in 0..batches.len() - 1 {
        let json = serde_json::to_string(&batches[cut].state).unwrap();
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        let mut resumed = ShardLoader::open(&urls, cfg, &state).unwrap();
        for expected in &batches[cut + 1..] {
            let got = resumed.next_batch().unwrap();
            assert_eq!(got.keys, expected.keys, "resumed after batch {cut}");
            assert_eq!(got.images, expected.images);
            assert_eq!(got.state, expected.state);
        }
    }
}

#[test]
fn impossible_splits_and_states_are_refused_clearly() {
    let urls = numbered_shards("memory://refuse/shards", &[2, 2]);
    let err = |cfg, state: &LoaderState| {
        ShardLoader::open(&urls, config(2, cfg), state)
            .err()
            .expect("refused")
            .to_string()
    };
    let e = err(reader(0, 3), &LoaderState::default());
    assert!(
        e.contains("2 shard(s) cannot be split across 3 ranks"),
        "{e}"
    );
    let e = err(reader(3, 3), &LoaderState::default());
    assert!(e.contains("rank 3"), "{e}");
    let bad = LoaderState {
        pending: vec![(7, 0)],
        ..LoaderState::default()
    };
    let e = err(reader(0, 1), &bad);
    assert!(e.contains("shard 7"), "{e}");
}
