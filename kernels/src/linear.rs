//! A Linear layer applied to a few rows (the one new position per sequence of KV-cached
//! sampling) on the CPU backend: the product streams the weight matrix once, in its stored
//! `[d_in, d_out]` layout, split by input rows over the threads, every weight row used for
//! all input rows while it is in cache. A general GEMM packs the weights on every call,
//! which for a handful of rows costs more than the product; here nothing is packed and the
//! time is the memory read of the weights.
//!
//! On other backends, on tensors that track gradients, or for more than [`MAX_ROWS`] rows,
//! burn's `Linear` runs.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn_backend::DType;
use burn_flex::{Flex, FlexTensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu::{f32s, tensor};

/// Most rows computed by the streaming product.
pub const MAX_ROWS: usize = 32;

/// Weight rows per task.
const ROWS_PER_TASK: usize = 64;

/// `layer.forward(x)` for `x` of `[b, t, d_in]`.
pub fn linear(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, t, _] = x.dims();
    if b * t > MAX_ROWS || !crate::cpu::kernels_enabled() {
        return layer.forward(x);
    }
    let bias = layer.bias.as_ref().map(|p| p.val());
    match try_flex(&x, &layer.weight.val(), bias.as_ref()) {
        Some(y) => y,
        None => layer.forward(x),
    }
}

fn try_flex(x: &Tensor<3>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<3>> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let [b, t, d_in] = x.dims();
    let [_, d_out] = weight.dims();
    let xp = x.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
    let wp = weight
        .clone()
        .try_into_primitive::<Flex>()
        .ok()?
        .to_contiguous();
    let bp: Option<FlexTensor> = match bias {
        Some(bias) => Some(
            bias.clone()
                .try_into_primitive::<Flex>()
                .ok()?
                .to_contiguous(),
        ),
        None => None,
    };
    let out = rows_times_matrix(
        f32s(&xp),
        f32s(&wp),
        bp.as_ref().map(f32s),
        [b * t, d_in, d_out],
    );
    Some(Tensor::from_primitive::<Flex>(tensor(
        out,
        [b, t, d_out].into(),
    )))
}

/// `x @ w + bias` for `x` of `[m, k]` and `w` of `[k, n]`, all row-major; `[m, n]`.
pub fn rows_times_matrix(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    [m, k, n]: [usize; 3],
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w.len(), k * n, "w is [k, n]");
    let partial = |i0: usize| {
        let i1 = (i0 + ROWS_PER_TASK).min(k);
        let mut y = vec![0.0f32; m * n];
        accumulate(x, &w[i0 * n..i1 * n], [m, k, n], i0, &mut y);
        y
    };
    let mut y = (0..k)
        .into_par_iter()
        .step_by(ROWS_PER_TASK)
        .map(partial)
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0.0; m * n]);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bias is [n]");
        y.chunks_mut(n)
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
    }
    y
}

/// Adds the product of `x[:, i0..i0 + rows]` and the weight rows `w` (`rows x n`) to `y`,
/// four weight rows per pass over `y`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn accumulate(x: &[f32], w: &[f32], [m, k, n]: [usize; 3], i0: usize, y: &mut [f32]) {
    let mut quads = w.chunks_exact(4 * n);
    for (q, rows) in quads.by_ref().enumerate() {
        let (w0, rest) = rows.split_at(n);
        let (w1, rest) = rest.split_at(n);
        let (w2, w3) = rest.split_at(n);
        for (r, yrow) in y.chunks_exact_mut(n).enumerate().take(m) {
            let a = &x[r * k + i0 + 4 * q..][..4];
            for ((((v, w0), w1), w2), w3) in yrow.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                *v += a[0] * w0 + a[1] * w1 + a[2] * w2 + a[3] * w3;
            }
        }
    }
    let done = (w.len() / n) / 4 * 4;
    for (di, wrow) in quads.remainder().chunks_exact(n).enumerate() {
        for (r, yrow) in y.chunks_exact_mut(n).enumerate().take(m) {
            let a = x[r * k + i0 + done + di];
            yrow.iter_mut().zip(wrow).for_each(|(v, w)| *v += a * w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    use crate::cpu::assert_all_close;

    /// The streaming product equals burn's Linear for 1 to 32 rows, with and without bias,
    /// at widths that do not divide the task size.
    #[test]
    fn equals_burns_linear() {
        let device = Device::flex();
        device.seed(3);
        for (d_in, d_out, bias) in [(512, 1025, false), (130, 70, true), (7, 5, true)] {
            let layer = LinearConfig::new(d_in, d_out).with_bias(bias).init(&device);
            for (b, t) in [(1, 1), (16, 1), (2, 3), (1, 32)] {
                let x = Tensor::<3>::random([b, t, d_in], Distribution::Normal(0.0, 1.0), &device);
                let ours = try_flex(
                    &x,
                    &layer.weight.val(),
                    layer.bias.as_ref().map(|p| p.val()).as_ref(),
                )
                .expect("a Flex f32 tensor");
                let theirs = layer.forward(x);
                assert_eq!(ours.dims(), theirs.dims());
                let v = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
                assert_all_close(&["y"], &[v(ours)], &[v(theirs)], 1e-5);
            }
        }
    }

    /// Tensors that track gradients are left to burn.
    #[test]
    fn refuses_autodiff_tensors() {
        let device = Device::flex().autodiff();
        let layer = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<3>::ones([1, 1, 4], &device).require_grad();
        assert!(try_flex(&x, &layer.weight.val(), None).is_none());
        assert_eq!(linear(&layer, x).dims(), [1, 1, 3]);
    }
}
