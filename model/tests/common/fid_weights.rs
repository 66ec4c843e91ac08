//! pytorch-fid's Inception with generated weights, as a PyTorch checkpoint: the weights the
//! FID fixture script (`tools/fixtures/make_fid_fixtures.py`) gave pytorch-fid, regenerated
//! bit for bit from the same formula (the real file cannot be downloaded, a random one cannot
//! be committed). Included by path with `torch_writer.rs` beside it as `crate::torch_writer`.
#![allow(dead_code)]

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::torch_writer::{Pickle, entry, zip};

/// FNV-1a 64 of a tensor's name: its generator's seed.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixture script's value of element `i` of tensor `name` of `shape` (f64, then f32).
pub fn generated(name: &str, shape: &[usize]) -> Vec<f32> {
    let seed = fnv1a(name);
    let fan_in: usize = shape.iter().skip(1).product();
    (0..shape.iter().product::<usize>())
        .map(|i| {
            let z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let u = (splitmix(z) >> 40) as f64 / (1u64 << 24) as f64;
            let v = if name.ends_with("conv.weight") {
                (2.0 * u - 1.0) * (6.0 / fan_in as f64).sqrt()
            } else if name.ends_with("bn.weight") || name.ends_with("bn.running_var") {
                0.5 + u
            } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") {
                0.2 * (2.0 * u - 1.0)
            } else if name.starts_with("fc.") {
                0.01 * (2.0 * u - 1.0)
            } else {
                panic!("no rule for {name}")
            };
            v as f32
        })
        .collect()
}

/// pytorch-fid's Inception checkpoint of the generated weights listed in `layout` (the
/// fixture's `weights.json`), after checking them against the SHA-256 it records.
pub fn weights_file(layout: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(layout).unwrap();
    let layout: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut digest = Sha256::new();
    let mut pickle = Pickle::new();
    pickle.op(b"}");
    let mut entries = vec![entry("byteorder", "little")];
    for (key, t) in layout["tensors"].as_array().unwrap().iter().enumerate() {
        let name = t[0].as_str().unwrap();
        let shape: Vec<usize> = serde_json::from_value(t[1].clone()).unwrap();
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let numel: usize = shape.iter().product();
        let (storage, bytes): (&str, Vec<u8>) = match t[2].as_str().unwrap() {
            "int64" => ("LongStorage", vec![0; 8 * numel]),
            "float32" => (
                "FloatStorage",
                generated(name, &shape)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => panic!("{name}: dtype {other}"),
        };
        digest.update(format!("{name}\0[{}]\0", dims.join(", ")).as_bytes());
        digest.update(&bytes);
        // Contiguous strides.
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1] as i64;
        }
        let size: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        pickle.str(name);
        pickle.tensor_of(storage, &key.to_string(), numel as i64, 0, &size, &stride);
        pickle.op(b"s");
        entries.push(entry(&format!("data/{key}"), bytes));
    }
    let hex: String = digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        layout["sha256"].as_str().unwrap(),
        "the regenerated weights differ from the fixture script's"
    );
    entries.insert(0, entry("data.pkl", pickle.finish()));
    zip(&entries)
}
