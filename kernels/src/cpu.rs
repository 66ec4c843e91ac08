//! The operations written for burn's Flex (CPU) backend ([`crate::conv`], [`crate::norm`]):
//! the switch between them and burn's own, and helpers they share.

use std::sync::atomic::{AtomicBool, Ordering};

use burn_backend::DType;
use burn_flex::{FlexTensor, Layout};
use burn_std::{Bytes, Shape};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns taming-rs's CPU kernels on (the default) or off (burn's own operations, for
/// comparisons).
pub fn set_kernels(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether taming-rs's CPU kernels are used where they apply.
pub fn kernels_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The values of a contiguous f32 tensor.
pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// A contiguous f32 tensor of `shape` holding `values`.
pub(crate) fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// Asserts that each of `ours` is within `tol` x (the largest magnitude in `theirs`, or 1)
/// of the same-named vector of `theirs`.
#[cfg(test)]
pub(crate) fn assert_all_close(what: &[&str], ours: &[Vec<f32>], theirs: &[Vec<f32>], tol: f32) {
    assert_eq!(ours.len(), theirs.len());
    for ((name, a), b) in what.iter().zip(ours).zip(theirs) {
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(b)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= tol * scale,
            "{name}: off by {worst} (scale {scale})"
        );
    }
}
