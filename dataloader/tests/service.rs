//! The dataloader service over loopback gRPC: batches as the local loader makes them, and bad
//! requests refused. Fail-over after a killed instance is tested with real processes in
//! dataloader/cli/tests.

mod common;

use std::time::{Duration, Instant};

use common::{config, mask_png, numbered_shards, png_from, put_shard};
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::runtime;
use taming_dataloader::service::{
    DataloaderService, MAX_BATCH_BYTES, ServiceOptions, serve_listener, serve_service,
};
use taming_dataloader::shards::DataRoots;
use taming_dataloader::{BatchSource, DataError, LoaderState, ReaderConfig, ShardLoader};
use taming_proto::auth::AttachToken;
use taming_proto::dataloader::dataloader_client::DataloaderClient;
use taming_proto::dataloader::{Batch, DType, HealthRequest, StreamRequest};
use tonic::{Code, Status, Streaming};

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

/// Starts an instance with `opts` on a free port.
fn start_with(opts: ServiceOptions) -> String {
    let listener = runtime::block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    runtime::io().spawn(serve_service(
        DataloaderService::new(opts),
        listener,
        None,
        std::future::pending(),
    ));
    addr
}

/// A request for one batch of two 8 x 8 samples of `shards`.
fn request(shards: &[String]) -> StreamRequest {
    StreamRequest {
        shards: shards.to_vec(),
        world_size: 1,
        batch_size: 2,
        size: 8,
        max_batches: 1,
        ..Default::default()
    }
}

/// `StreamBatches` at `addr`, with `token` (none: no `authorization` header), and its first
/// message.
fn call(addr: &str, token: Option<&str>, req: StreamRequest) -> Result<Batch, Status> {
    open(addr, token, req)?.1
}

/// `StreamBatches` at `addr`: the open stream and its first message.
#[allow(clippy::type_complexity)]
fn open(
    addr: &str,
    token: Option<&str>,
    req: StreamRequest,
) -> Result<(Streaming<Batch>, Result<Batch, Status>), Status> {
    let url = format!("http://{addr}");
    runtime::block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = DataloaderClient::with_interceptor(channel, AttachToken::new(token));
        let mut stream = client.stream_batches(req).await?.into_inner();
        let first = stream
            .message()
            .await
            .map(|m| m.expect("a batch before the end"));
        Ok((stream, first))
    })
}

fn refused(result: Result<Batch, Status>, code: Code, words: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(status.message().contains(w), "`{w}` in {status:?}");
    }
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

/// A service with a token streams only to callers that send it; the standard gRPC health
/// check (Kubernetes probes) answers without one.
#[test]
fn calls_without_the_cluster_token_are_refused() {
    let urls = numbered_shards("memory://svc-token/d", &[4]);
    let addr = start_with(ServiceOptions {
        token: Some("s3cret".into()),
        ..ServiceOptions::default()
    });
    refused(
        call(&addr, None, request(&urls)),
        Code::Unauthenticated,
        &["missing cluster token"],
    );
    refused(
        call(&addr, Some("s3cres"), request(&urls)),
        Code::Unauthenticated,
        &["wrong cluster token"],
    );
    refused(
        call(&addr, Some("s3cret-and-more"), request(&urls)),
        Code::Unauthenticated,
        &["wrong cluster token"],
    );
    let batch = call(&addr, Some("s3cret"), request(&urls)).unwrap();
    assert_eq!(batch.keys.len(), 2);

    // The client sends the token it is given; a wrong one fails at once, naming the cause.
    let cfg = config(2, reader());
    let mut good = RemoteLoader::new(
        vec![addr.clone()],
        urls.clone(),
        cfg,
        LoaderState::default(),
    )
    .token(Some("s3cret"));
    assert_eq!(good.next_batch().unwrap().keys.len(), 2);
    let started = Instant::now();
    let err = RemoteLoader::new(vec![addr.clone()], urls, cfg, LoaderState::default())
        .token(Some("guess"))
        .next_batch()
        .unwrap_err();
    assert!(err.to_string().contains("wrong cluster token"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "not retried");

    // Health: the standard service without a token; the data plane's own Health needs it.
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let url = format!("http://{addr}");
    runtime::block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
        let status = DataloaderClient::new(channel)
            .health(HealthRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    });
}

/// Requests that would make the service allocate without bound are refused before anything
/// is allocated, naming the field, and the instance goes on serving.
#[test]
fn oversized_requests_are_refused_and_the_service_goes_on() {
    let urls = numbered_shards("memory://svc-big/d", &[4]);
    let (addr, _server) = start();
    let with = |f: &dyn Fn(&mut StreamRequest)| {
        let mut r = request(&urls);
        f(&mut r);
        call(&addr, None, r)
    };
    // 10^14 names: refused from the pattern, before expanding it.
    refused(
        with(&|r| r.shards = vec!["s3://b/{0..9999999}{0..9999999}.tar".into()]),
        Code::ResourceExhausted,
        &["shards", "100000000000000 names"],
    );
    // Each pattern under the cap, all of them together over it.
    refused(
        with(&|r| r.shards = vec!["memory://x/{0..999999}.tar".into(); 3]),
        Code::ResourceExhausted,
        &["shards", "3000000 names"],
    );
    // 4096 x 3 x 4096 x 4096 bytes would be a 206 GB buffer.
    refused(
        with(&|r| (r.batch_size, r.size) = (4096, 4096)),
        Code::ResourceExhausted,
        &["batch_size/size", &MAX_BATCH_BYTES.to_string()],
    );
    refused(
        with(&|r| (r.batch_size, r.size, r.dtype) = (64, 1024, DType::F32 as i32)),
        Code::ResourceExhausted,
        &["batch_size/size"],
    );
    // A resume state naming more buffered samples than the buffer holds.
    let pending: Vec<(usize, u64)> = (0..1000).map(|i| (0, i)).collect();
    let state = serde_json::to_string(&LoaderState {
        pending,
        ..LoaderState::default()
    })
    .unwrap();
    refused(
        with(&|r| r.state = state.clone()),
        Code::InvalidArgument,
        &["state", "1000 pending"],
    );
    // Still serving.
    assert_eq!(call(&addr, None, request(&urls)).unwrap().keys.len(), 2);
}

/// Local shards: none without data roots; with them, only below them, whatever `..`,
/// symbolic links or `file://` say.
#[test]
fn local_shards_are_read_only_below_the_data_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, secret) = (tmp.path().join("data"), tmp.path().join("secret"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    let img = png_from(8, 8, |_, _| [1, 2, 3]);
    let shard = |p: &std::path::Path| {
        put_shard(
            p.to_str().unwrap(),
            &[("a.png", &img[..]), ("b.png", &img[..])],
        )
    };
    shard(&data.join("train-0.tar"));
    shard(&secret.join("train-0.tar"));
    std::os::unix::fs::symlink(&secret, data.join("link")).unwrap();
    let text = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let inside = text(data.join("train-0.tar"));

    let (addr, _server) = start();
    for spec in [inside.clone(), "/etc/".into(), "/etc/passwd".into()] {
        refused(
            call(&addr, None, request(&[spec])),
            Code::InvalidArgument,
            &["shards", "local path", "--data-root"],
        );
    }

    let addr = start_with(ServiceOptions {
        data_roots: DataRoots::new([data.clone()]).unwrap(),
        ..ServiceOptions::default()
    });
    assert_eq!(
        call(&addr, None, request(std::slice::from_ref(&inside)))
            .unwrap()
            .keys,
        ["a", "b"]
    );
    assert_eq!(
        call(&addr, None, request(&[format!("{}/", data.display())]))
            .unwrap()
            .keys,
        ["a", "b"],
        "a directory below a root is listed"
    );
    for spec in [
        "/etc/passwd".to_string(),
        "/etc/".into(),
        "file:///etc/passwd".into(),
        text(secret.join("train-0.tar")),
        format!("{}/../secret/train-0.tar", data.display()),
        text(data.join("link/train-0.tar")),
        text(data.join("link/missing.tar")),
        format!("{}/{{data,secret}}/train-0.tar", tmp.path().display()),
    ] {
        refused(
            call(&addr, None, request(std::slice::from_ref(&spec))),
            Code::InvalidArgument,
            &["shards", "outside the data roots"],
        );
    }
    let err = DataRoots::new([tmp.path().join("nowhere")]).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

/// At most `max_streams` streams at once; a slot frees when its client goes away.
#[test]
fn streams_past_the_limit_wait_for_a_free_slot() {
    let urls = numbered_shards("memory://svc-slots/d", &[4]);
    let addr = start_with(ServiceOptions {
        max_streams: 1,
        ..ServiceOptions::default()
    });
    let endless = |r: &mut StreamRequest| r.max_batches = 0;
    let mut first = request(&urls);
    endless(&mut first);
    let (stream, batch) = open(&addr, None, first.clone()).unwrap();
    batch.unwrap();
    refused(
        call(&addr, None, request(&urls)),
        Code::ResourceExhausted,
        &["max_streams"],
    );
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call(&addr, None, request(&urls)) {
            Ok(b) => {
                assert_eq!(b.keys.len(), 2);
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(s) => panic!("the slot was not freed: {s:?}"),
        }
    }
}
