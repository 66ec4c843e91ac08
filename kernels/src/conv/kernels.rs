//! Convolution gradients as one large GEMM per sample over an im2col buffer (f32, one group).
//!
//! burn's generic `conv2d_weight_backward` runs a convolution whose channels are the batch and
//! whose kernel is the whole output gradient: a GEMM only 9 columns wide for a 3x3 kernel,
//! which runs in gemm's narrowest microkernel. Here the weight gradient is
//! `grad_out[n] (Cout x P) @ col[n]^T (P x Cin*kh*kw)` summed over the batch and the input
//! gradient is `col2im(W^T (Cin*kh*kw x Cout) @ grad_out[n])`, both wide GEMMs.

use std::cell::RefCell;
use std::ops::Range;

use multiversion::multiversion;
use rayon::prelude::*;

/// The largest im2col buffer, in floats (32 MiB).
pub const MAX_COL: usize = 1 << 23;

/// Shape of one 2-d convolution with a single group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Output channels.
    pub cout: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride per spatial dimension.
    pub stride: [usize; 2],
    /// Zero padding (before, after) per spatial dimension.
    pub padding: [(usize, usize); 2],
    /// Dilation per spatial dimension.
    pub dilation: [usize; 2],
}

impl Geometry {
    /// Output height and width.
    pub fn output(&self) -> [usize; 2] {
        let out = |d: usize| {
            let span = self.dilation[d] * (self.kernel[d] - 1) + 1;
            let (before, after) = self.padding[d];
            (self.input[d] + before + after - span) / self.stride[d] + 1
        };
        [out(0), out(1)]
    }

    /// Rows of the im2col buffer: `cin * kh * kw`.
    pub fn patch(&self) -> usize {
        self.cin * self.kernel[0] * self.kernel[1]
    }

    fn plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    fn positions(&self) -> usize {
        let [ho, wo] = self.output();
        ho * wo
    }

    /// Input index (row or column) read by output index `o` at kernel offset `k`, if inside.
    fn source(&self, d: usize, o: usize, k: usize) -> Option<usize> {
        let i = (o * self.stride[d] + k * self.dilation[d]).checked_sub(self.padding[d].0)?;
        (i < self.input[d]).then_some(i)
    }

    /// Output indices `lo..hi` whose source at kernel offset `k` lies inside the input.
    fn valid_range(&self, d: usize, k: usize, len: usize) -> (usize, usize) {
        let lo = (0..len).find(|&o| self.source(d, o, k).is_some());
        let hi = (0..len).rev().find(|&o| self.source(d, o, k).is_some());
        match (lo, hi) {
            (Some(lo), Some(hi)) => (lo, hi + 1),
            _ => (0, 0),
        }
    }

    /// Whether the im2col buffer of one sample stays within [`MAX_COL`] floats (32 MiB): the
    /// gradients need it whole, so larger convolutions (such as 128 channels at 256x256) train
    /// through burn's implementation. The forward works in bands of output rows instead.
    pub fn fits(&self) -> bool {
        self.is_pointwise() || self.patch() * self.positions() <= MAX_COL
    }

    /// Output rows per band of the forward (at least one), for im2col buffers of at most
    /// `max_col` floats.
    fn band_rows(&self, max_col: usize) -> usize {
        let [ho, wo] = self.output();
        if self.is_pointwise() {
            return ho.max(1);
        }
        (max_col / (self.patch() * wo).max(1)).clamp(1, ho.max(1))
    }

    /// A 1x1 convolution without stride or padding, whose im2col is its input.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [(0, 0); 2]
    }

    fn row_offsets(&self, row: usize) -> (usize, usize, usize) {
        let [kh, kw] = self.kernel;
        (row / (kh * kw), (row / kw) % kh, row % kw)
    }
}

/// Fills `col` (`patch x (rows.len() * wo)`, row-major) with the patches of one sample `x`
/// (`cin x h x w`) for the output rows `rows`.
pub fn im2col(g: &Geometry, x: &[f32], rows: Range<usize>, col: &mut [f32], par: bool) {
    let [_, wo] = g.output();
    let [_, w] = g.input;
    for_chunks(col, rows.len() * wo, par, |row, out| {
        let (ci, ky, kx) = g.row_offsets(row);
        let plane = &x[ci * g.plane()..][..g.plane()];
        let (lo, hi) = g.valid_range(1, kx, wo);
        for (i, oy) in rows.clone().enumerate() {
            let dst = &mut out[i * wo..][..wo];
            let Some(iy) = g.source(0, oy, ky) else {
                dst.fill(0.0);
                continue;
            };
            let src = &plane[iy * w..][..w];
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if lo < hi {
                let first = lo * g.stride[1] + kx * g.dilation[1] - g.padding[1].0;
                if g.stride[1] == 1 {
                    dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                        *d = src[first + j * g.stride[1]];
                    }
                }
            }
        }
    });
}

/// Adds the patches in `col` (`patch x positions`) back into one sample `dx` (`cin x h x w`),
/// which is overwritten.
pub fn col2im(g: &Geometry, col: &[f32], dx: &mut [f32], par: bool) {
    for_chunks(dx, g.plane(), par, |ci, plane| {
        col2im_plane(g, col, ci, plane)
    });
}

/// [`col2im`] for input channel `ci`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn col2im_plane(g: &Geometry, col: &[f32], ci: usize, plane: &mut [f32]) {
    let [ho, wo] = g.output();
    let [_, w] = g.input;
    let [kh, kw] = g.kernel;
    let p = ho * wo;
    plane.fill(0.0);
    for ky in 0..kh {
        for kx in 0..kw {
            let row = &col[((ci * kh + ky) * kw + kx) * p..][..p];
            let (lo, hi) = g.valid_range(1, kx, wo);
            if lo >= hi {
                continue;
            }
            let first = lo * g.stride[1] + kx * g.dilation[1] - g.padding[1].0;
            for oy in 0..ho {
                let Some(iy) = g.source(0, oy, ky) else {
                    continue;
                };
                let src = &row[oy * wo + lo..oy * wo + hi];
                let dst = &mut plane[iy * w..][..w];
                if g.stride[1] == 1 {
                    let dst = &mut dst[first..first + src.len()];
                    dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
                } else {
                    for (j, v) in src.iter().enumerate() {
                        dst[first + j * g.stride[1]] += v;
                    }
                }
            }
        }
    }
}

/// Runs `f(index, chunk)` over the `len`-sized chunks of `buf`, on all threads when `par`.
fn for_chunks<F>(buf: &mut [f32], len: usize, par: bool, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if par {
        let min = (4096 / len.max(1)).max(1);
        buf.par_chunks_mut(len)
            .with_min_len(min)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        buf.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Runs `f(n, chunk, par)` for each sample's `len`-sized chunk of `buf`: samples in parallel
/// with serial insides when there are at least as many samples as threads, else one sample at
/// a time with parallel insides.
fn for_samples<F>(g: &Geometry, buf: &mut [f32], len: usize, f: F)
where
    F: Fn(usize, &mut [f32], bool) + Sync,
{
    if split_samples(g) {
        buf.par_chunks_mut(len)
            .enumerate()
            .for_each(|(n, c)| f(n, c, false));
    } else {
        for (n, c) in buf.chunks_mut(len).enumerate() {
            f(n, c, true);
        }
    }
}

thread_local! {
    /// Each thread's im2col buffer, kept between convolutions: a fresh one per call costs a
    /// zero fill and, for large ones, page faults. At most [`Geometry::fits`]'s 32 MiB.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` floats (contents unspecified).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    // Taken out for the call: rayon may run another convolution's job on this thread while
    // `f` waits, and that one then allocates its own.
    let mut buf = SCRATCH.with(RefCell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|cell| {
        if cell.borrow().len() < buf.len() {
            cell.replace(buf);
        }
    });
    out
}

pub(super) fn split_samples(g: &Geometry) -> bool {
    g.batch >= rayon::current_num_threads()
}

/// Runs `f(patches, row_stride)` on the im2col of one sample for the output rows `rows`, or
/// on the sample itself (from the first row on) for a pointwise convolution.
fn with_patches<R>(
    g: &Geometry,
    x: &[f32],
    rows: Range<usize>,
    par: bool,
    f: impl FnOnce(&[f32], usize) -> R,
) -> R {
    let [_, wo] = g.output();
    if g.is_pointwise() {
        return f(&x[rows.start * wo..], g.positions());
    }
    let cols = rows.len() * wo;
    with_scratch(g.patch() * cols, |col| {
        im2col(g, x, rows, col, par);
        f(col, cols)
    })
}

/// One sample's input (`cin x h x w`).
fn sample<'a>(g: &Geometry, x: &'a [f32], n: usize) -> &'a [f32] {
    &x[n * g.cin * g.plane()..][..g.cin * g.plane()]
}

/// One sample's output or output gradient (`cout x positions`).
fn sample_out<'a>(g: &Geometry, out: &'a [f32], n: usize) -> &'a [f32] {
    let len = g.cout * g.positions();
    &out[n * len..][..len]
}

/// The convolution itself: `out[n] (cout x positions) = W (cout x patch) @ col[n] + bias`.
pub fn forward(g: &Geometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    forward_in_bands(g, x, weight, bias, MAX_COL)
}

/// [`forward`] over bands of output rows whose im2col buffers hold at most `max_col` floats.
fn forward_in_bands(
    g: &Geometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    max_col: usize,
) -> Vec<f32> {
    let (k, p) = (g.patch(), g.positions());
    let [ho, wo] = g.output();
    let band = g.band_rows(max_col);
    let mut out = vec![0.0f32; g.batch * g.cout * p];
    for_samples(g, &mut out, g.cout * p, |n, dst, par| {
        if let Some(bias) = bias {
            for (plane, b) in dst.chunks_mut(p).zip(bias) {
                plane.fill(*b);
            }
        }
        for start in (0..ho).step_by(band) {
            let rows = start..(start + band).min(ho);
            let cols = rows.len() * wo;
            with_patches(g, sample(g, x, n), rows, par, |patches, stride| {
                // The band's columns of every output channel: a strided view into `dst`.
                let d = Matrix::row_major(dst[start * wo..].as_mut_ptr(), p);
                let lhs = Matrix::row_major(weight.as_ptr().cast_mut(), k);
                let rhs = Matrix::row_major(patches.as_ptr().cast_mut(), stride);
                // SAFETY: every matrix lies inside its buffer for the given shape and strides.
                unsafe { gemm_f32([g.cout, cols, k], d, bias.is_some(), lhs, rhs, par) };
            });
        }
    });
    out
}

/// Gradient of the weight (`cout x cin x kh x kw`) from the input `x` (`batch x cin x h x w`)
/// and the output gradient (`batch x cout x ho x wo`).
pub fn weight_grad(g: &Geometry, x: &[f32], grad_out: &[f32]) -> Vec<f32> {
    let len = g.cout * g.patch();
    // dw (cout x k) += go[n] (cout x p) @ col[n]^T (p x k). Single-threaded, gemm runs this
    // 10-50% faster into a column-major dw (BENCHMARKS.md); threaded, into a row-major one.
    let add_sample = |dw: &mut [f32], n: usize, par: bool| {
        let all_rows = 0..g.output()[0];
        with_patches(g, sample(g, x, n), all_rows, par, |patches, stride| {
            let dst = if par {
                Matrix::row_major(dw.as_mut_ptr(), g.patch())
            } else {
                Matrix::col_major(dw.as_mut_ptr(), g.cout)
            };
            let lhs = Matrix::row_major(
                sample_out(g, grad_out, n).as_ptr().cast_mut(),
                g.positions(),
            );
            let rhs = Matrix::col_major(patches.as_ptr().cast_mut(), stride);
            let shape = [g.cout, g.patch(), g.positions()];
            // SAFETY: every matrix lies inside its buffer for the given shape and strides.
            unsafe { gemm_f32(shape, dst, true, lhs, rhs, par) };
        });
    };
    // Partial sums per thread cost a pass over the weight each: not for small images.
    if !split_samples(g) || g.positions() < 256 {
        let mut dw = vec![0.0f32; len];
        (0..g.batch).for_each(|n| add_sample(&mut dw, n, true));
        return dw;
    }
    let dw_t = (0..g.batch)
        .into_par_iter()
        .fold(
            || vec![0.0f32; len],
            |mut dw_t, n| {
                add_sample(&mut dw_t, n, false);
                dw_t
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0.0; len]);
    transpose(&dw_t, g.patch(), g.cout)
}

/// The transpose (`cols x rows`) of a row-major `rows x cols` matrix, in square blocks so
/// that both sides stay in cache.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 32;
    let mut out = vec![0.0f32; m.len()];
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    out
}

/// Gradient of the input (`batch x cin x h x w`) from the weight (`cout x cin x kh x kw`) and
/// the output gradient (`batch x cout x ho x wo`).
pub fn input_grad(g: &Geometry, weight: &[f32], grad_out: &[f32]) -> Vec<f32> {
    let (k, p) = (g.patch(), g.positions());
    let mut dx = vec![0.0f32; g.batch * g.cin * g.plane()];
    for_samples(g, &mut dx, g.cin * g.plane(), |n, dxn, par| {
        // col (k x p) = W^T (k x cout) @ go (cout x p), straight into dx when pointwise
        let product = |target: &mut [f32]| {
            let dst = Matrix::row_major(target.as_mut_ptr(), p);
            let lhs = Matrix::col_major(weight.as_ptr().cast_mut(), k);
            let rhs = Matrix::row_major(sample_out(g, grad_out, n).as_ptr().cast_mut(), p);
            // SAFETY: every matrix lies inside its buffer for the given shape and strides.
            unsafe { gemm_f32([k, p, g.cout], dst, false, lhs, rhs, par) };
        };
        if g.is_pointwise() {
            product(dxn);
        } else {
            with_scratch(k * p, |col| {
                product(col);
                col2im(g, col, dxn, par);
            });
        }
    });
    dx
}

/// A strided view of a matrix for `gemm`.
#[derive(Clone, Copy)]
pub(super) struct Matrix {
    ptr: *mut f32,
    row_stride: isize,
    col_stride: isize,
}

impl Matrix {
    pub(super) fn row_major(ptr: *mut f32, cols: usize) -> Self {
        Self {
            ptr,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    pub(super) fn col_major(ptr: *mut f32, rows: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: rows as isize,
        }
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)`, threaded when `par` and large.
///
/// # Safety
/// Each view must address valid memory for its shape; `dst` must not alias the others.
pub(super) unsafe fn gemm_f32(
    [m, n, k]: [usize; 3],
    dst: Matrix,
    accumulate: bool,
    lhs: Matrix,
    rhs: Matrix,
    par: bool,
) {
    let parallelism = if par && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride,
            dst.row_stride,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct definition of the convolution's gradients, one multiply-add at a time.
    fn naive(g: &Geometry, x: &[f32], w: &[f32], go: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let [h, wi] = g.input;
        let [kh, kw] = g.kernel;
        let [ho, wo] = g.output();
        let mut dw = vec![0.0; g.cout * g.patch()];
        let mut dx = vec![0.0; g.batch * g.cin * h * wi];
        for n in 0..g.batch {
            for co in 0..g.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let gv = go[((n * g.cout + co) * ho + oy) * wo + ox];
                        for ci in 0..g.cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (Some(iy), Some(ix)) =
                                        (g.source(0, oy, ky), g.source(1, ox, kx))
                                    else {
                                        continue;
                                    };
                                    let xi = ((n * g.cin + ci) * h + iy) * wi + ix;
                                    let wi_ = ((co * g.cin + ci) * kh + ky) * kw + kx;
                                    dw[wi_] += gv * x[xi];
                                    dx[xi] += gv * w[wi_];
                                }
                            }
                        }
                    }
                }
            }
        }
        (dw, dx)
    }

    fn naive_forward(g: &Geometry, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let [h, wi] = g.input;
        let [kh, kw] = g.kernel;
        let [ho, wo] = g.output();
        let mut out = vec![0.0; g.batch * g.cout * ho * wo];
        for n in 0..g.batch {
            for co in 0..g.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias[co];
                        for ci in 0..g.cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    if let (Some(iy), Some(ix)) =
                                        (g.source(0, oy, ky), g.source(1, ox, kx))
                                    {
                                        acc += x[((n * g.cin + ci) * h + iy) * wi + ix]
                                            * w[((co * g.cin + ci) * kh + ky) * kw + kx];
                                    }
                                }
                            }
                        }
                        out[((n * g.cout + co) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Checks both thread plans: samples in parallel (1 thread) and one at a time (4 threads).
    fn check(g: Geometry) {
        for threads in [1, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(pool.install(|| split_samples(&g)), threads <= g.batch);
            pool.install(|| check_once(g));
        }
    }

    fn check_once(g: Geometry) {
        let [ho, wo] = g.output();
        let x = values(g.batch * g.cin * g.plane(), 1);
        let w = values(g.cout * g.patch(), 2);
        let go = values(g.batch * g.cout * ho * wo, 3);
        let (dw, dx) = naive(&g, &x, &w, &go);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()))
        };
        assert!(close(&weight_grad(&g, &x, &go), &dw), "weight grad {g:?}");
        let bias = values(g.cout, 4);
        let out = naive_forward(&g, &x, &w, &bias);
        assert!(
            close(&forward(&g, &x, &w, Some(&bias)), &out),
            "forward {g:?}"
        );
        assert!(close(&input_grad(&g, &w, &go), &dx), "input grad {g:?}");
    }

    fn geometry(
        cin: usize,
        cout: usize,
        input: [usize; 2],
        k: usize,
        s: usize,
        p: usize,
    ) -> Geometry {
        Geometry {
            batch: 2,
            cin,
            input,
            cout,
            kernel: [k, k],
            stride: [s, s],
            padding: [(p, p); 2],
            dilation: [1, 1],
        }
    }

    #[test]
    fn gradients_match_the_definition() {
        check(geometry(3, 5, [7, 6], 3, 1, 1));
        check(geometry(4, 3, [9, 9], 3, 2, 0));
        check(geometry(2, 4, [8, 10], 4, 2, 1));
        check(geometry(3, 2, [6, 5], 1, 1, 0));
        check(geometry(2, 3, [5, 5], 4, 1, 1));
        check(Geometry {
            padding: [(0, 1), (1, 0)],
            ..geometry(3, 2, [8, 7], 3, 2, 0)
        });
        check(Geometry {
            dilation: [2, 1],
            ..geometry(2, 2, [9, 8], 3, 1, 2)
        });
        // At least 256 positions: per-thread partial weight gradients, column-major.
        check(geometry(2, 3, [17, 16], 3, 1, 1));
    }

    #[test]
    fn the_forward_in_bands_matches_the_definition() {
        for (g, max_col) in [
            (geometry(3, 4, [9, 7], 3, 1, 1), 400),
            (geometry(4, 3, [9, 9], 3, 2, 0), 1),
            (geometry(3, 2, [6, 5], 1, 1, 0), 1),
        ] {
            assert!(g.band_rows(max_col) < g.output()[0] || g.is_pointwise());
            let x = values(g.batch * g.cin * g.plane(), 1);
            let w = values(g.cout * g.patch(), 2);
            let bias = values(g.cout, 4);
            let ours = forward_in_bands(&g, &x, &w, Some(&bias), max_col);
            let theirs = naive_forward(&g, &x, &w, &bias);
            let close = ours
                .iter()
                .zip(&theirs)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            assert!(close, "{g:?} in bands of {} rows", g.band_rows(max_col));
        }
    }

    #[test]
    fn blocked_transpose_transposes() {
        for (rows, cols) in [(1, 1), (3, 70), (33, 65), (64, 32)] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&m, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
        }
    }
}
