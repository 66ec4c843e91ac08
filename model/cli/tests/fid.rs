//! `vqgan fid` against pytorch-fid 0.3.0 (`tools/fixtures/make_fid_fixtures.py`): its
//! Inception-v3 with generated weights (the real file cannot be downloaded here), which this
//! test regenerates bit for bit from the same formula and writes as a PyTorch checkpoint;
//! features of two small sets of real photos within 1e-4 of pytorch-fid's, their FID within
//! 1e-3 (relative), from folders, shards and saved statistics alike.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/fid_weights.rs"]
mod fid_weights;
#[path = "../../tests/common/torch_writer.rs"]
mod torch_writer;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor};
use common::{Expected, assert_close_to_max, fixtures_dir};
use fid_weights::weights_file;
use taming_import::inception::{WeightsCheck, load_fid_inception};
use taming_model::inception::prepare;
use taming_model_cli::fid::unit_tensor;

fn fid_dir() -> PathBuf {
    fixtures_dir().join("fid")
}

/// The generated weights as a PyTorch checkpoint (written once per test binary), after
/// checking them against the SHA-256 the fixture script recorded.
fn weights() -> &'static Path {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &FILE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fid_inception_generated.pth");
            std::fs::write(&path, weights_file(&fid_dir().join("weights.json"))).unwrap();
            (dir, path)
        })
        .1
}

fn vqgan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqgan"))
        .args(args)
        .output()
        .expect("run vqgan")
}

fn ok(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "vqgan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fid_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_relative(what: &str, ours: f64, reference: f64, tol: f64) {
    assert!(
        (ours - reference).abs() <= tol * reference.abs(),
        "{what}: {ours} vs pytorch-fid's {reference} (relative tolerance {tol})"
    );
}

/// `vqgan fid A B` with the generated weights.
fn fid(a: &str, b: &str) -> serde_json::Value {
    ok(vqgan(&[
        "fid",
        "--inception",
        s(weights()),
        "--any-weights",
        a,
        b,
    ]))
}

#[test]
fn features_are_pytorch_fids() {
    let device = Device::flex();
    let net = load_fid_inception(weights(), WeightsCheck::AnyWeights, &device).unwrap();
    let reference = Expected::from_file(&fid_dir().join("expected.safetensors"));
    for set in ["a", "b"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(fid_dir().join(format!("set_{set}")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let images: Vec<Tensor<4>> = files
            .iter()
            .map(|f| prepare(unit_tensor(&image::open(f).unwrap().into_rgb8(), &device)))
            .collect();
        let ours = net
            .features_299(Tensor::cat(images, 0))
            .try_into_vec_as::<f32>()
            .unwrap();
        let (shape, theirs) = reference.f32s(&format!("features_{set}"));
        assert_eq!(shape, [4, 2048]);
        assert_close_to_max(&format!("features of set {set}"), &ours, &theirs, 1e-4);
    }
}

#[test]
fn fid_of_folders_and_shards_is_pytorch_fids() {
    let expected = expected();
    let set_a = fid_dir().join("set_a");
    let reference = expected["fid"].as_f64().unwrap();
    let folders = fid(s(&set_a), s(&fid_dir().join("set_b")));
    assert_relative(
        "FID of the folders",
        folders["fid"].as_f64().unwrap(),
        reference,
        1e-3,
    );
    assert_eq!(folders["n"], serde_json::json!([4, 4]));
    // The same photos as a WebDataset shard.
    let shards = fid(s(&set_a), s(&fid_dir().join("shards_b")));
    assert_relative(
        "FID against shards",
        shards["fid"].as_f64().unwrap(),
        reference,
        1e-3,
    );
}

#[test]
fn saved_statistics_stand_in_for_their_images() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("a.npz");
    let set_a = fid_dir().join("set_a");
    let args = [
        "fid",
        "--inception",
        s(weights()),
        "--any-weights",
        "--save-stats",
    ];
    let saved = ok(vqgan(&[&args[..], &[s(&stats), s(&set_a)]].concat()));
    assert_eq!(saved["n"], 4);
    // Saved statistics are never overwritten.
    let again = vqgan(&[&args[..], &[s(&stats), s(&set_a)]].concat());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("a.npz"));

    let from_stats = fid(s(&stats), s(&fid_dir().join("set_b")));
    assert_relative(
        "FID from saved statistics",
        from_stats["fid"].as_f64().unwrap(),
        expected()["fid"].as_f64().unwrap(),
        1e-3,
    );
    // numpy's statistics files (compressed and not): no Inception needed.
    let small = ok(vqgan(&[
        "fid",
        s(&fid_dir().join("small_a.npz")),
        s(&fid_dir().join("small_b.npz")),
    ]));
    assert_relative(
        "FID of numpy's .npz files",
        small["fid"].as_f64().unwrap(),
        expected()["small_fid"].as_f64().unwrap(),
        1e-9,
    );
}

#[test]
fn other_weights_are_refused_by_their_hash_unless_accepted() {
    let set_a = fid_dir().join("set_a");
    let out = vqgan(&["fid", "--inception", s(weights()), s(&set_a), s(&set_a)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fid_inception_generated.pth") && err.contains("SHA-256"),
        "{err}"
    );
    assert!(err.contains("--any-weights"), "{err}");
    // Images need the network.
    let out = vqgan(&["fid", s(&set_a), s(&set_a)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--inception"));
}
