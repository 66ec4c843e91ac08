//! Hostile PyTorch checkpoints, written byte by byte here, given to the real `vqgan
//! import-taming` under a 1 GiB address-space limit: each must be refused within seconds with
//! an error naming the file and what was refused, never by running out of memory or stack.
#![cfg(unix)]

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/torch_writer.rs"]
mod torch_writer;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use taming_import::torch_file::{RawData, TorchCheckpoint};
use torch_writer::{Entry, Pickle, entry, zip};

/// Address-space limit for the binary, in KiB (1 GiB).
const LIMIT_KIB: u64 = 1 << 20;
/// How long a refusal may take, generous for a loaded machine; they take well under a second.
const DEADLINE: Duration = Duration::from_secs(20);

/// A state dict `{name: tensor}` over one f32 storage `data/0` holding `values`.
fn one_tensor(values: &[f32], size: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}").str("w");
    p.tensor("0", values.len() as i64, 0, size, stride);
    let storage: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    zip(&[
        entry("data.pkl", p.op(b"s").finish()),
        entry("byteorder", "little"),
        entry("data/0", storage),
    ])
}

fn repeat(byte: u8, n: usize) -> Vec<u8> {
    std::iter::repeat_n(byte, n).collect()
}

/// A checkpoint whose `data.pkl` is `pickle`.
fn with_pickle(pickle: Vec<u8>) -> Vec<u8> {
    zip(&[entry("data.pkl", pickle), entry("byteorder", "little")])
}

// ---- running the binary ---------------------------------------------------------------

/// Runs `vqgan import-taming` on `bytes` saved as `name` under the address-space limit;
/// asserts a plain failure (exit 1, no signal, no panic) within [`DEADLINE`] and that stderr
/// names the file and every fragment of `expected`.
fn assert_refused(name: &str, bytes: &[u8], expected: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join(name);
    std::fs::write(&ckpt, bytes).unwrap();
    let (status, stderr, took) = import_limited(&ckpt, &tmp.path().join("out"));
    assert_eq!(
        status.signal(),
        None,
        "{name}: killed by a signal after {took:?}; stderr: {stderr}"
    );
    assert_eq!(
        status.code(),
        Some(1),
        "{name}: expected an error exit; stderr: {stderr}"
    );
    assert!(stderr.contains(name), "{name}: file not named: {stderr}");
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "{name}: no {fragment:?} in: {stderr}"
        );
    }
    assert!(!tmp.path().join("out").exists(), "{name}: output written");
}

fn import_limited(ckpt: &Path, out: &Path) -> (std::process::ExitStatus, String, Duration) {
    let config = fixture("vq_a").join("model.yaml");
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {LIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_vqgan"))
        .arg("import-taming")
        .arg("--config")
        .arg(&config)
        .arg("--ckpt")
        .arg(ckpt)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vqgan");
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        pipe.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            child.kill().ok();
            child.wait().ok();
            panic!("{}: still running after {DEADLINE:?}", ckpt.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    (status, reader.join().unwrap(), took)
}

// ---- the corpus -------------------------------------------------------------------------

#[test]
fn the_limit_leaves_room_for_a_real_import() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ckpt = fixture("vq_a").join("model.ckpt");
    let (status, stderr, _) = import_limited(&ckpt, &out);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(out.exists());
}

#[test]
fn memo_bomb_is_refused() {
    // memo[0] = []; memo[k + 1] = (memo[k], memo[k]): 2^64 leaves from ~700 bytes.
    let mut p = Pickle::new();
    p.op(b"]r").op(&0u32.to_le_bytes());
    for k in 0..64u32 {
        p.op(b"j")
            .op(&k.to_le_bytes())
            .op(b"j")
            .op(&k.to_le_bytes());
        p.op(&[0x86, b'r']).op(&(k + 1).to_le_bytes());
    }
    let bytes = with_pickle(p.finish());
    assert!(bytes.len() < 2000);
    assert_refused("memo_bomb.ckpt", &bytes, &["memo", "MiB", "refused"]);
}

#[test]
fn dup_bomb_is_refused() {
    let mut p = Pickle::new();
    p.op(b"N");
    for _ in 0..64 {
        p.op(&[b'2', 0x86]);
    }
    let bytes = with_pickle(p.finish());
    assert_refused("dup_bomb.ckpt", &bytes, &["DUP", "MiB", "refused"]);
}

#[test]
fn deep_nesting_is_refused() {
    // None in 300k one-tuples; then 300k empty lists, each appended into the one below.
    let mut p = Pickle::new();
    p.op(b"N").op(&repeat(0x85, 300_000));
    assert_refused(
        "deep_tuples.ckpt",
        &with_pickle(p.finish()),
        &["1000 levels"],
    );
    let mut p = Pickle::new();
    p.op(&repeat(b']', 300_000)).op(&repeat(b'a', 299_999));
    assert_refused(
        "deep_lists.ckpt",
        &with_pickle(p.finish()),
        &["1000 levels"],
    );
}

#[test]
fn zip_entries_declaring_a_terabyte_are_refused() {
    const TIB: u64 = 1 << 40;
    let pickle = |deflate| {
        let mut p = Pickle::new();
        p.op(b"}");
        Entry {
            deflate,
            declared: Some(TIB),
            ..entry("data.pkl", p.finish())
        }
    };
    for (name, deflate) in [("stored_tib.ckpt", false), ("deflated_tib.ckpt", true)] {
        let bytes = zip(&[pickle(deflate), entry("byteorder", "little")]);
        assert_refused(
            name,
            &bytes,
            &[
                "archive/data.pkl",
                "declares 1099511627776 bytes",
                "archive's",
            ],
        );
    }
    // The storage of a tensor.
    let mut p = Pickle::new();
    p.op(b"}").str("w");
    p.tensor("0", 4, 0, &[4], &[1]);
    let bytes = zip(&[
        entry("data.pkl", p.op(b"s").finish()),
        Entry {
            declared: Some(TIB),
            ..entry("data/0", vec![0; 16])
        },
    ]);
    assert_refused(
        "storage_tib.ckpt",
        &bytes,
        &[
            "tensor `w`",
            "archive/data/0",
            "declares 1099511627776 bytes",
            "archive's",
        ],
    );
}

#[test]
fn stride_zero_views_with_huge_shapes_are_refused() {
    // One float viewed as 2^20 x 2^20 (4 TiB as f32).
    let bytes = one_tensor(&[1.0], &[1 << 20, 1 << 20], &[0, 0]);
    assert_refused(
        "stride0_huge.ckpt",
        &bytes,
        &["tensor `w`", "[1048576, 1048576]"],
    );
    // One float viewed as 4096 x 4096 (64 MiB): within the budget, but far beyond its storage.
    let bytes = one_tensor(&[1.0], &[4096, 4096], &[0, 0]);
    assert_refused(
        "stride0_64mib.ckpt",
        &bytes,
        &["tensor `w`", "repeats a storage of 1 elements"],
    );
    // A shape whose element count overflows.
    let bytes = one_tensor(&[1.0], &[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]);
    assert_refused(
        "stride0_overflow.ckpt",
        &bytes,
        &["tensor `w`", "more elements"],
    );
    // Strides far past the storage, and strides whose reach overflows.
    let bytes = one_tensor(&[1.0, 2.0], &[2, 2], &[i64::MAX / 2, 1]);
    assert_refused(
        "stride_far.ckpt",
        &bytes,
        &["tensor `w`", "storage holds 2"],
    );
    let bytes = one_tensor(&[1.0, 2.0], &[3, 3], &[i64::MAX, i64::MAX]);
    assert_refused(
        "stride_overflow.ckpt",
        &bytes,
        &["tensor `w`", "needs more than memory can hold"],
    );
}

#[test]
fn lengths_past_the_end_of_the_pickle_are_refused() {
    for (name, op) in [("binbytes8.ckpt", 0x8e), ("binunicode8.ckpt", 0x8d)] {
        let mut p = Pickle::new();
        p.op(&[op]).op(&(1u64 << 60).to_le_bytes());
        let bytes = with_pickle(p.finish());
        assert_refused(
            name,
            &bytes,
            &["declares 1152921504606846976 bytes", "1 remain"],
        );
    }
    let mut p = Pickle::new();
    p.op(&[0x8b]).op(&u32::MAX.to_le_bytes()); // LONG4
    assert_refused(
        "long4.ckpt",
        &with_pickle(p.finish()),
        &["declares 4294967295 bytes"],
    );
}

// ---- the library, in process ----------------------------------------------------------

#[test]
fn a_small_broadcast_view_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broadcast.pt");
    std::fs::write(&path, one_tensor(&[1.0, 2.0, 3.0], &[2, 3], &[0, 1])).unwrap();
    let tensors = TorchCheckpoint::open(&path).unwrap().state_dict().unwrap();
    assert_eq!(tensors["w"].shape, vec![2, 3]);
    assert_eq!(
        tensors["w"].data,
        RawData::F32(vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    );
}

#[test]
fn many_views_of_one_storage_are_budgeted() {
    // 64 tensors, each a full view of one 8 MiB storage: 512 MiB materialized from an 8 MiB
    // file, past 4x the file plus 256 MiB.
    let numel = 2 << 20;
    let mut p = Pickle::new();
    p.op(b"}(");
    for i in 0..64 {
        p.str(&format!("w{i}"));
        p.tensor("0", numel, 0, &[numel], &[1]);
    }
    let bytes = zip(&[
        entry("data.pkl", p.op(b"u").finish()),
        entry("data/0", vec![0; numel as usize * 4]),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("aliased.pt");
    std::fs::write(&path, bytes).unwrap();
    let err = TorchCheckpoint::open(&path)
        .unwrap()
        .state_dict()
        .map(|tensors| tensors.len())
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("aliased.pt") && err.contains("more than the") && err.contains("refused"),
        "{err}"
    );
}
