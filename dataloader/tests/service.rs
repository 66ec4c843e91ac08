//! The dataloader service over loopback gRPC: batches as the local loader makes them, and bad
//! requests refused. Fail-over after a killed instance is tested with real processes in
//! dataloader/cli/tests.

mod common;

use common::{config, mask_png, numbered_shards, png_from, put_shard};
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::runtime;
use taming_dataloader::service::serve_listener;
use taming_dataloader::{BatchSource, DataError, LoaderState, ReaderConfig, ShardLoader};
use taming_proto::dataloader::dataloader_client::DataloaderClient;
use taming_proto::dataloader::{DType, StreamRequest};

/// Starts an instance on a free port; aborting the handle kills it.
fn start() -> (String, tokio::task::JoinHandle<()>) {
    let listener = runtime::block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = runtime::io().spawn(async move {
        serve_listener(listener, std::future::pending())
            .await
            .unwrap();
    });
    (addr, handle)
}

fn reader() -> ReaderConfig {
    ReaderConfig {
        read_slots: 2,
        shuffle_buffer: 4,
        seed: 5,
        ..ReaderConfig::default()
    }
}

/// Sent as bytes (converted by the client) or as f32 tensors (converted by the service).
#[test]
fn remote_batches_equal_local_ones_as_bytes_or_floats() {
    let urls = numbered_shards("memory://svc-equal/d", &[4, 5, 3]);
    let (addr, _server) = start();
    let cfg = config(3, reader());
    for floats in [false, true] {
        let mut local = ShardLoader::open(&urls, cfg, &LoaderState::default()).unwrap();
        let remote = RemoteLoader::new(
            vec![addr.clone()],
            urls.clone(),
            cfg,
            LoaderState::default(),
        );
        let mut remote = if floats { remote.floats() } else { remote };
        for _ in 0..6 {
            let (l, r) = (local.next_batch().unwrap(), remote.next_batch().unwrap());
            assert_eq!(l.keys, r.keys);
            assert_eq!(l.images, r.images, "floats: {floats}");
            assert_eq!(l.labels, r.labels);
            assert_eq!(l.state, r.state);
        }
    }
    // What `floats` asks for, on the wire: f32 tensors of the local loader's values.
    let mut client =
        runtime::block_on(DataloaderClient::connect(format!("http://{addr}"))).unwrap();
    let request_shards = urls.clone();
    let request = StreamRequest {
        shards: urls,
        world_size: 1,
        batch_size: 3,
        size: 8,
        shuffle: true,
        dtype: DType::F32 as i32,
        max_batches: 1,
        ..Default::default()
    };
    let mut stream = runtime::block_on(client.stream_batches(request))
        .unwrap()
        .into_inner();
    let batch = runtime::block_on(stream.message())
        .unwrap()
        .expect("a batch");
    let images = batch.images.expect("images");
    assert_eq!(images.dtype, DType::F32 as i32);
    assert_eq!(images.shape, [3, 3, 8, 8]);
    let values: Vec<f32> = images
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // The same request as a local loader: shards shuffled with seed 0, one read slot.
    let config = config(3, ReaderConfig::default());
    let mut local = ShardLoader::open(&request_shards, config, &LoaderState::default()).unwrap();
    assert_eq!(values, local.next_batch().unwrap().images);
}

/// A trainer that needs label maps gets them through the service too: samples without one
/// are skipped by the instance and counted for the client.
#[test]
fn required_label_maps_are_kept_and_samples_without_one_skipped_remotely() {
    let (img, seg) = (
        png_from(8, 8, |x, y| [x as u8, y as u8, 0]),
        mask_png(8, 8, |_, y| y as u8),
    );
    let files = [
        ("a.png", &img),
        ("a.seg.png", &seg),
        ("b.png", &img),
        ("c.png", &img),
        ("c.seg.png", &seg),
    ];
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, &d[..])).collect();
    put_shard("memory://svc-masks/train-0.tar", &files);
    let urls = vec!["memory://svc-masks/train-0.tar".to_string()];
    let (addr, _server) = start();
    let cfg = taming_dataloader::LoaderConfig {
        require_masks: true,
        ..config(2, ReaderConfig::default())
    };
    let mut remote = RemoteLoader::new(vec![addr], urls, cfg, LoaderState::default());
    let batch = remote.next_batch().unwrap();
    assert_eq!(batch.keys, ["a", "c"]);
    let rows: Vec<u8> = (0..8u8).flat_map(|y| [y; 8]).collect();
    assert_eq!(batch.masks.unwrap(), [rows.clone(), rows].concat());
    assert_eq!(remote.skipped(), 1);
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let urls = numbered_shards("memory://svc-bad/d", &[2]);
    let (addr, _server) = start();
    let mut cfg = config(0, reader());
    let err = RemoteLoader::new(
        vec![addr.clone()],
        urls.clone(),
        cfg,
        LoaderState::default(),
    )
    .next_batch()
    .unwrap_err();
    assert!(matches!(err, DataError::Service { .. }));
    assert!(err.to_string().contains("batch_size"), "{err}");
    cfg.batch_size = 2;
    cfg.reader.world_size = 2;
    cfg.reader.rank = 5;
    let err = RemoteLoader::new(vec![addr.clone()], urls, cfg, LoaderState::default())
        .next_batch()
        .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    let cfg = config(2, reader());
    let missing = vec!["memory://svc-bad/none.tar".to_string()];
    let err = RemoteLoader::new(vec![addr], missing, cfg, LoaderState::default())
        .next_batch()
        .unwrap_err();
    assert!(err.to_string().contains("none.tar"), "{err}");
}

#[test]
fn with_every_instance_gone_the_client_errors_clearly() {
    let urls = numbered_shards("memory://svc-gone/d", &[2]);
    let mut client = RemoteLoader::new(
        vec!["127.0.0.1:1".into()],
        urls,
        config(2, reader()),
        LoaderState::default(),
    );
    let err = client.next_batch().unwrap_err().to_string();
    assert!(err.contains("every instance failed"), "{err}");
}
