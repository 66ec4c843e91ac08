//! Shards go both ways between taming-rs and the Python WebDataset (PyPI `webdataset`, what
//! its users read and write shards with): `dataloader pack` output reads in Python with the
//! same keys, classes and files, and a shard Python's `TarWriter` wrote reads in the loader.

mod common;

use std::process::Command;

use common::image_folder;
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ShardLoader};
use taming_tests::process::succeed;
use taming_tests::python;

/// Every sample of the shards as Python's WebDataset yields it: key, `.cls`, the `.json`
/// class name and the sample's extensions.
const READ: &str = r#"
import json, sys
import webdataset as wds
out = []
for s in wds.WebDataset(sys.argv[1:], shardshuffle=False):
    exts = sorted(k for k in s if not k.startswith("__"))
    out.append({"key": s["__key__"], "cls": int(s["cls"]), "class": json.loads(s["json"])["class"], "exts": exts})
print(json.dumps(out))
"#;

/// Writes one shard with Python's TarWriter: samples `p0`.. with a PNG (from argv files)
/// and a `.cls` each.
const WRITE: &str = r#"
import sys
import webdataset as wds
out, pngs = sys.argv[1], sys.argv[2:]
with wds.TarWriter(out) as sink:
    for i, path in enumerate(pngs):
        sink.write({"__key__": f"nested/p{i}", "png": open(path, "rb").read(), "cls": i + 10})
"#;

fn loader(shards: &[String]) -> ShardLoader {
    let pre = Preprocess {
        size: 16,
        random_crop: false,
        flip: false,
    };
    let cfg = LoaderConfig::simple(64, pre, 0, false);
    ShardLoader::open(shards, cfg, &LoaderState::default()).unwrap()
}

#[test]
fn packed_shards_read_in_python_webdataset_with_the_same_samples() {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(&tmp.path().join("in"));
    let out = tmp.path().join("shards");
    succeed(
        Command::new(env!("CARGO_BIN_EXE_dataloader"))
            .args(["pack", "--layout", "imagefolder", "--shard-mb", "0.002"])
            .arg("--input")
            .arg(tmp.path().join("in"))
            .arg("--out")
            .arg(&out),
    );
    let shards = list_split(out.to_str().unwrap(), "train").unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    let text = python::run(READ, &shards);
    let samples: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let batch = loader(&shards).next_in_epoch().unwrap().unwrap();
    assert_eq!(samples.len(), batch.keys.len());
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["key"], batch.keys[i].as_str());
        assert_eq!(s["cls"].as_i64(), batch.labels[i]);
        let class = if batch.labels[i] == Some(0) { "a" } else { "b" };
        assert_eq!(s["class"], class);
        assert_eq!(s["exts"], serde_json::json!(["cls", "json", "png"]));
    }
}

#[test]
fn a_shard_written_by_python_webdataset_reads_in_the_loader() {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    let pngs: Vec<String> = (0..3)
        .map(|i| tmp.path().join(format!("a/{i}.png")).display().to_string())
        .collect();
    let shard = tmp.path().join("train-000000.tar").display().to_string();
    python::run(WRITE, &[vec![shard.clone()], pngs].concat());
    let batch = loader(&[shard]).next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys, ["nested/p0", "nested/p1", "nested/p2"]);
    assert_eq!(batch.labels, [Some(10), Some(11), Some(12)]);
    // The images are the files written: pixel (0, 0) red of image i is 40 i.
    for i in 0..3 {
        let red = batch.images[i * 3 * 256];
        assert_eq!(((red + 1.0) * 127.5).round() as u8, 40 * i as u8);
    }
}
