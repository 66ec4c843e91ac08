//! `dataloader serve --metrics`: the Prometheus endpoint counts what a real client streamed,
//! the samples it had to skip, its open streams, and answers other paths with 404.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use taming_dataloader::client::RemoteLoader;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig};
use taming_tests::http::get;
use taming_tests::process::spawn_announcing;

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing from\n{metrics}"))
}

/// A shard of 6 good samples and 2 whose image does not decode.
fn shard_with_bad_samples(dir: &std::path::Path) -> String {
    let path = dir.join("mixed-000000.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: String, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).unwrap();
    };
    for i in 0..8 {
        let png = if i % 4 == 3 {
            b"not a png at all".to_vec()
        } else {
            let img = image::RgbImage::from_pixel(32, 32, image::Rgb([i as u8 * 20, 0, 0]));
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
            buf.into_inner()
        };
        add(format!("s{i:03}.png"), &png);
    }
    tar.finish().unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn metrics_count_samples_errors_and_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (_service, said) = spawn_announcing(
        Command::new(env!("CARGO_BIN_EXE_dataloader"))
            .args(["serve", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--data-root")
            .arg(tmp.path())
            .arg("--data-root")
            .arg(root.join("data"))
            .stderr(Stdio::null()),
        &["listening on ", "metrics on http://"],
    );
    let grpc = said[0].clone();
    let http = said[1].trim_end_matches("/metrics").to_string();

    let (code, before) = get(&http, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(value(&before, "taming_dataloader_samples_total"), 0.0);
    assert_eq!(value(&before, "taming_dataloader_clients"), 0.0);

    let shards = vec![
        shard_with_bad_samples(tmp.path()),
        root.join("data/fashion-mnist/val-000000.tar")
            .to_string_lossy()
            .into_owned(),
    ];
    let cfg = LoaderConfig {
        batch_size: 10,
        preprocess: Preprocess {
            size: 32,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig::default(),
        require_masks: false,
    };
    let mut client =
        RemoteLoader::new(vec![grpc], shards, cfg, LoaderState::default()).single_epoch();
    let mut got = 0;
    for _ in 0..5 {
        got += client.next_in_epoch().unwrap().unwrap().keys.len();
    }
    let (_, during) = get(&http, "/metrics");
    assert_eq!(
        value(&during, "taming_dataloader_clients"),
        1.0,
        "one open stream"
    );
    assert!(value(&during, "taming_dataloader_samples_total") >= got as f64);
    assert_eq!(value(&during, "taming_dataloader_decode_errors_total"), 2.0);
    assert!(value(&during, "taming_dataloader_batches_total") >= 5.0);
    assert!(value(&during, "taming_dataloader_samples_per_second") > 0.0);
    value(&during, "taming_dataloader_queue_depth");
    assert_eq!(value(&during, "taming_spans_dropped_total"), 0.0);
    assert!(during.contains("# TYPE taming_dataloader_samples_total counter"));
    assert_eq!(get(&http, "/").0, 404);
    assert_eq!(get(&http, "/metrics/../x").0, 404);
}
