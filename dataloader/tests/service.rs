//! The dataloader service over loopback gRPC: batches as the local loader makes them, and bad
//! requests refused. Fail-over after a killed instance is tested with real processes in
//! dataloader/cli/tests.

mod common;

use common::{config, numbered_shards};
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::runtime;
use taming_dataloader::service::serve_listener;
use taming_dataloader::{BatchSource, DataError, LoaderState, ReaderConfig, ShardLoader};

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

#[test]
fn remote_batches_equal_local_ones() {
    let urls = numbered_shards("memory://svc-equal/d", &[4, 5, 3]);
    let (addr, _server) = start();
    let cfg = config(3, reader());
    let mut local = ShardLoader::open(&urls, cfg, &LoaderState::default()).unwrap();
    let mut remote = RemoteLoader::new(vec![addr], urls, cfg, LoaderState::default());
    for _ in 0..6 {
        let (l, r) = (local.next_batch().unwrap(), remote.next_batch().unwrap());
        assert_eq!(l.keys, r.keys);
        assert_eq!(l.images, r.images);
        assert_eq!(l.labels, r.labels);
        assert_eq!(l.state, r.state);
    }
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
