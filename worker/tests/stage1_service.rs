//! `worker train --dataloader ADDR`: stage-1 training fed by a dataloader service instance.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use taming_dataloader::runtime;
use taming_dataloader::service::{DataloaderService, ServiceOptions, serve_service};
use taming_dataloader::shards::DataRoots;
use taming_tests::process::{root, succeed, tiny_config};

#[test]
fn training_streams_its_batches_from_the_dataloader_service() {
    let service = DataloaderService::new(ServiceOptions {
        data_roots: DataRoots::new([root().join("data")]).unwrap(),
        ..Default::default()
    });
    let stats = service.stats();
    let listener = runtime::block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    runtime::io().spawn(serve_service(
        service,
        listener,
        None,
        std::future::pending(),
    ));

    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let train = |out: &Path, extra: &[&str]| {
        succeed(
            Command::new(env!("CARGO_BIN_EXE_worker"))
                .args(["--prefetch", "2"])
                .args(["train", "--stage", "vqgan", "--steps", "3", "--quiet"])
                .arg("--config")
                .arg(&config)
                .arg("--data")
                .arg(root().join("data/fashion-mnist"))
                .arg("--out")
                .arg(out)
                .args(extra),
        )
    };
    let (remote, local) = (tmp.path().join("run"), tmp.path().join("local"));
    train(&remote, &["--dataloader", &addr]);
    assert!(remote.join("model/model.safetensors").is_file());
    assert!(
        stats.served.load(Ordering::Relaxed) >= 3,
        "the training batches came from the service"
    );
    // Received ahead of the steps, they are the batches the worker would decode itself.
    train(&local, &[]);
    common::assert_same(
        &common::exported_params(&remote),
        &common::exported_params(&local),
    );
}
