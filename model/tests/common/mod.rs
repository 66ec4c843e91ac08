//! Shared helpers for the integration tests of the model, import and CLI crates: fixture paths and tensor comparison.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

/// `model/tests/fixtures`, from any crate of the workspace.
pub fn fixtures_dir() -> PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").exists())
        .expect("the workspace root");
    root.join("model/tests/fixtures")
}

/// Directory of one fixture config (`vq_a`, `vq_b`, `gumbel`).
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("vqgan").join(name)
}

/// The reference's outputs for a fixture.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    /// Loads `expected.safetensors` of fixture `name`.
    pub fn load(name: &str) -> Self {
        Self::from_file(&fixture(name).join("expected.safetensors"))
    }

    /// Loads any safetensors file of expected values.
    pub fn from_file(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    /// The first value of f32 tensor `name`.
    pub fn scalar(&self, name: &str) -> f32 {
        self.f32s(name).1[0]
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("safetensors")
    }

    /// Shape and f32 values of tensor `name`.
    pub fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    /// Shape and i64 values of tensor `name`.
    pub fn i64s(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    /// Tensor `name` on `device`.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (shape, v) = self.f32s(name);
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// Integer tensor `name` on `device`.
    pub fn int_tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D, Int> {
        let (shape, v) = self.i64s(name);
        Tensor::from_data(TensorData::new(v, shape), device)
    }
}

/// Values of a float tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

/// Values of an integer tensor.
pub fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.try_into_vec_as::<i64>().unwrap()
}

/// Asserts `|ours - ref| <= tol * max|ref|` elementwise, reporting the worst element.
pub fn assert_close_to_max(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (worst, at) = ours
        .iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (a, b))| ((a - b).abs(), i))
        .fold((0f32, 0), |m, x| if x.0 > m.0 { x } else { m });
    assert!(
        worst <= tol * scale,
        "{what}: max |diff| {worst} at {at} exceeds {tol} x max|ref| {scale} (ours {}, ref {})",
        ours[at],
        reference[at]
    );
}

/// Relative difference `|a - b| / |b|`.
/// Asserts `|ours - ref|_2 <= tol * |ref|_2`: for gradients that pass through ReLUs and max
/// pools, where a pre-activation within rounding of zero (or a near tie) may go either way
/// under a different summation order and move a single pixel's value.
pub fn assert_close_l2(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
    let diff = norm(&mut ours.iter().zip(reference).map(|(a, b)| a - b));
    let scale = norm(&mut reference.iter().copied());
    assert!(
        diff <= tol * scale,
        "{what}: |diff|_2 {diff} exceeds {tol} x |ref|_2 {scale}"
    );
}

pub fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(f32::MIN_POSITIVE)
}
