//! What TLS costs on the dataloader stream: `cargo bench -p taming-dataloader --bench
//! tls_stream -- CERT_DIR [--batches 200] [--rounds 3]`, with CERT_DIR made by `coordinator
//! certs --names localhost`. Two in-process services on loopback read the same shards (the
//! embedded data, decoded once into the page cache by a warm-up), one plaintext and one over
//! mutual TLS; a client takes `--batches` f32 batches of 32 64x64 images (1.5 MiB each) from
//! each in turn, `--rounds` times, and the megabytes per second of each are printed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use taming_dataloader::client::RemoteLoader;
use taming_dataloader::service::{DataloaderService, ServiceOptions, serve_service};
use taming_dataloader::shards::{DataRoots, list_split};
use taming_dataloader::{
    BatchSource, LoaderConfig, LoaderState, Preprocess, ReaderConfig, runtime,
};
use taming_proto::tls::Transport;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// A service over `transport` on a free loopback port; its address.
fn start(transport: &Transport, data: &Path) -> String {
    let listener = runtime::block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let bound = listener.local_addr().unwrap();
    let tls = transport.server(bound, "the bench service").unwrap();
    let service = DataloaderService::new(ServiceOptions {
        data_roots: DataRoots::new([data.to_path_buf()]).unwrap(),
        ..Default::default()
    });
    runtime::io().spawn(serve_service(
        service,
        listener,
        tls,
        std::future::pending(),
    ));
    bound.to_string()
}

/// Megabytes per second of `batches` f32 batches streamed from `addr`.
fn stream(addr: &str, transport: &Transport, shards: &[String], batches: usize) -> f64 {
    let cfg = LoaderConfig {
        batch_size: 32,
        preprocess: Preprocess {
            size: 64,
            random_crop: true,
            flip: false,
        },
        reader: ReaderConfig::default(),
        require_masks: false,
    };
    let mut client = RemoteLoader::new(
        vec![addr.into()],
        shards.to_vec(),
        cfg,
        LoaderState::default(),
    )
    .floats()
    .transport(transport.clone());
    client.next_batch().expect("a first batch");
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..batches {
        bytes += client.next_batch().expect("a batch").images.len() * 4;
    }
    bytes as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(certs) = args
        .iter()
        .find(|a| !a.starts_with("--") && Path::new(a).is_dir())
    else {
        eprintln!(
            "usage: tls_stream CERT_DIR [--batches 200] [--rounds 3] (coordinator certs --names localhost --out CERT_DIR)"
        );
        return;
    };
    let certs = PathBuf::from(certs);
    let (batches, rounds) = (arg(&args, "--batches", 200), arg(&args, "--rounds", 3));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let shards: Vec<String> = list_split(data.join("photo-crops"), "train")
        .expect("the embedded photo crops")
        .into_iter()
        .map(|p| {
            std::path::absolute(p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let tls = Transport::from_files(
        &certs.join("ca.pem"),
        &certs.join("localhost.pem"),
        &certs.join("localhost.key"),
    )
    .expect("the certificates");
    let plain = Transport::default();
    let (plain_addr, tls_addr) = (start(&plain, &data), start(&tls, &data));
    println!("round  plaintext MB/s  mTLS MB/s  TLS cost");
    for round in 1..=rounds {
        let p = stream(&plain_addr, &plain, &shards, batches);
        let t = stream(&tls_addr, &tls, &shards, batches);
        println!(
            "{round:>5}  {p:>14.1}  {t:>9.1}  {:>7.1}%",
            100.0 * (p - t) / p
        );
    }
}
