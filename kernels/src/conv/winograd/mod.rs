//! Winograd's F(2x2, 3x3) for 3x3 convolutions with stride 1 and padding 1 (most of the
//! VQGAN's and all of LPIPS's): 16 multiplications per 2x2 output tile where the direct
//! product needs 36, that is 16 GEMMs over transformed tiles instead of one 2.25x larger.
//!
//! Per block of tile rows of one sample, the input is transformed (`V = Bᵀ d B` per 4x4 tile),
//! multiplied by the transformed weight (`U = G g Gᵀ`) at each of the 16 tile positions ξ
//! (`M[ξ] = U[ξ] V[ξ]`) and transformed back (`Y = Aᵀ M A`); blocks are sized so that their
//! tiles stay in L2. The gradients are the adjoints of the same linear maps: the output
//! gradient's tiles `dM = A dY Aᵀ`, then `dV[ξ] = U[ξ]ᵀ dM[ξ]` scattered back through
//! `B dV Bᵀ`, and `dU[ξ] = Σ dM[ξ] V[ξ]ᵀ` folded back through `Gᵀ dU G`.

use rayon::prelude::*;

mod transforms;

use super::kernels::{Geometry, Matrix, gemm_f32, split_samples, with_scratch};
use transforms::{
    add_input_grad_tiles, input_tiles, output_grad_tiles, output_tiles, weight_from_tiles,
    weight_tiles,
};

/// Positions in a 4x4 tile.
const XI: usize = 16;
/// Floats between consecutive matrices of a stack of 16 beyond their own size: without
/// it, the 16 streams of a tile group often lie a multiple of 4 KiB apart, in one cache set.
const SKEW: usize = 16;

/// Start of matrix ξ (of `len` floats) in a stack of 16.
fn at_xi(xi: usize, len: usize) -> usize {
    xi * (len + SKEW)
}

/// Floats of a stack of 16 matrices of `len` floats.
fn stacked(len: usize) -> usize {
    at_xi(XI, len)
}

/// Floats of transformed tiles (input and output channels) per block: 1 MiB.
const BLOCK_FLOATS: usize = 1 << 18;
/// Tiles per block at least, whatever the channels: fewer make narrow GEMMs.
const MIN_TILES: usize = 64;

/// Whether the Winograd kernels can compute this convolution: 3x3, stride 1, padding 1, no
/// dilation, and an image of at least 16x16 (below, the im2col GEMM is faster:
/// BENCHMARKS.md).
fn eligible(g: &Geometry) -> bool {
    g.kernel == [3, 3]
        && g.stride == [1, 1]
        && g.dilation == [1, 1]
        && g.padding == [(1, 1); 2]
        && g.input.iter().all(|&d| d >= 16)
}

/// Whether the Winograd kernels compute this convolution's gradients: 3x3, stride 1,
/// padding 1, an image of at least 16x16, and at least as many samples as threads (each
/// thread takes whole samples).
pub fn applies(g: &Geometry) -> bool {
    eligible(g) && split_samples(g)
}

/// Whether the Winograd kernels compute this convolution's forward pass: 3x3, stride 1,
/// padding 1, an image of at least 16x16, and at least 16 input channels (the transforms
/// cost more than they save on an RGB image).
pub fn applies_forward(g: &Geometry) -> bool {
    eligible(g) && g.cin >= 16
}

/// Tile rows and columns (2x2 output tiles) covering the output, which is the input's size.
fn tiles(g: &Geometry) -> [usize; 2] {
    g.input.map(|d| d.div_ceil(2))
}

/// Tile rows per block.
fn block_rows(g: &Geometry) -> usize {
    let [th, tw] = tiles(g);
    let fit = BLOCK_FLOATS / (XI * (g.cin + g.cout) * tw);
    fit.max(MIN_TILES.div_ceil(tw)).clamp(1, th)
}

/// The tiles of one block: tile rows `rows` of a sample, `tw` tiles per row.
#[derive(Clone, Copy)]
struct Block {
    first_row: usize,
    rows: usize,
    tw: usize,
}

impl Block {
    fn len(&self) -> usize {
        self.rows * self.tw
    }
}

/// The blocks of tile rows of one sample.
fn blocks(g: &Geometry) -> impl Iterator<Item = Block> {
    let [th, tw] = tiles(g);
    let step = block_rows(g);
    (0..th).step_by(step).map(move |first_row| Block {
        first_row,
        rows: step.min(th - first_row),
        tw,
    })
}

/// `[rows x cols]` matrix `xi` of `16` stacked row-major ones.
fn slice_of(buf: &[f32], xi: usize, rows: usize, cols: usize) -> Matrix {
    Matrix::row_major(buf[at_xi(xi, rows * cols)..].as_ptr().cast_mut(), cols)
}

/// The convolution: `out[n] (cout x h x w)`. Samples run in parallel when there are as many
/// as threads; otherwise the blocks of each sample do.
pub fn forward(g: &Geometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let u = weight_tiles(g, weight);
    let plane = g.input[0] * g.input[1];
    let mut out = vec![0.0f32; g.batch * g.cout * plane];
    let run = |s: usize, y: &mut [f32]| {
        let xs = &x[s * g.cin * plane..][..g.cin * plane];
        if split_samples(g) {
            for block in blocks(g) {
                forward_block(g, (&u, xs, bias), block, (y, 0));
            }
        } else {
            forward_blocks_in_parallel(g, (&u, xs, bias), y);
        }
    };
    let samples = g.cout * plane;
    if split_samples(g) {
        out.par_chunks_mut(samples)
            .enumerate()
            .for_each(|(s, y)| run(s, y));
    } else {
        out.chunks_mut(samples)
            .enumerate()
            .for_each(|(s, y)| run(s, y));
    }
    out
}

/// The weight's tiles, one sample's input and the bias.
type Operands<'a> = (&'a [f32], &'a [f32], Option<&'a [f32]>);

/// One block of one sample into `y`, which holds output rows `first_row..`.
fn forward_block(g: &Geometry, (u, xs, bias): Operands, block: Block, y: (&mut [f32], usize)) {
    let n = block.len();
    with_scratch(stacked(g.cin * n) + stacked(g.cout * n), |buf| {
        let (v, m) = buf.split_at_mut(stacked(g.cin * n));
        input_tiles(g, xs, block, v);
        for xi in 0..XI {
            let dst = Matrix::row_major(m[at_xi(xi, g.cout * n)..].as_mut_ptr(), n);
            let (lhs, rhs) = (slice_of(u, xi, g.cout, g.cin), slice_of(v, xi, g.cin, n));
            // SAFETY: each matrix lies inside its buffer; `dst` aliases neither.
            unsafe { gemm_f32([g.cout, n, g.cin], dst, false, lhs, rhs, false) };
        }
        output_tiles(g, m, block, bias, y);
    });
}

/// One sample (`y`: `cout x h x w`), its blocks in parallel, each into a band of rows first.
fn forward_blocks_in_parallel(g: &Geometry, operands: Operands, y: &mut [f32]) {
    let [h, w] = g.input;
    let bands: Vec<(usize, Vec<f32>)> = blocks(g)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|block| {
            let first = 2 * block.first_row;
            let mut band = vec![0.0f32; g.cout * (2 * block.rows).min(h - first) * w];
            forward_block(g, operands, block, (&mut band, first));
            (first, band)
        })
        .collect();
    for (first, band) in bands {
        let len = band.len() / g.cout;
        for (c, rows) in band.chunks_exact(len).enumerate() {
            y[c * h * w + first * w..][..len].copy_from_slice(rows);
        }
    }
}

/// The input gradient (`batch x cin x h x w`) and the weight gradient (`cout x cin x 3 x 3`),
/// each when asked for, from the input, the weight and the output gradient.
pub fn backward(
    g: &Geometry,
    x: &[f32],
    weight: &[f32],
    grad_out: &[f32],
    [want_dx, want_dw]: [bool; 2],
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let u = weight_tiles(g, weight);
    let plane = g.input[0] * g.input[1];
    let (ci, co) = (g.cin, g.cout);
    let mut dx = vec![0.0f32; if want_dx { g.batch * ci * plane } else { 0 }];
    let du_len = if want_dw { stacked(co * ci) } else { 0 };
    let sample = |s: usize, dxs: &mut [f32], du: &mut [f32]| {
        let xs = &x[s * ci * plane..][..ci * plane];
        let dys = &grad_out[s * co * plane..][..co * plane];
        for block in blocks(g) {
            let n = block.len();
            with_scratch(stacked(ci * n) + stacked(co * n), |buf| {
                let (v, dm) = buf.split_at_mut(stacked(ci * n));
                output_grad_tiles(g, dys, block, dm);
                if want_dw {
                    input_tiles(g, xs, block, v);
                    for xi in 0..XI {
                        // dU[ξ] (co x ci) += dM[ξ] (co x n) @ V[ξ]ᵀ (n x ci)
                        // column-major: gemm runs this product faster into it
                        let dst = Matrix::col_major(du[at_xi(xi, co * ci)..].as_mut_ptr(), co);
                        let lhs = slice_of(dm, xi, co, n);
                        let rhs = Matrix::col_major(v[at_xi(xi, ci * n)..].as_ptr().cast_mut(), n);
                        // SAFETY: each matrix lies inside its buffer; `dst` aliases neither.
                        unsafe { gemm_f32([co, ci, n], dst, true, lhs, rhs, false) };
                    }
                }
                if want_dx {
                    for xi in 0..XI {
                        // dV[ξ] (ci x n) = U[ξ]ᵀ (ci x co) @ dM[ξ] (co x n)
                        let dst = Matrix::row_major(v[at_xi(xi, ci * n)..].as_mut_ptr(), n);
                        let lhs =
                            Matrix::col_major(u[at_xi(xi, co * ci)..].as_ptr().cast_mut(), ci);
                        let rhs = slice_of(dm, xi, co, n);
                        // SAFETY: each matrix lies inside its buffer; `dst` aliases neither.
                        unsafe { gemm_f32([ci, n, co], dst, false, lhs, rhs, false) };
                    }
                    add_input_grad_tiles(g, v, block, dxs);
                }
            });
        }
    };
    // Each sample's slice of the input gradient (empty ones when it is not wanted).
    let dx_samples: Vec<&mut [f32]> = if want_dx {
        dx.chunks_mut(ci * plane).collect()
    } else {
        (0..g.batch).map(|_| Default::default()).collect()
    };
    let du = dx_samples
        .into_par_iter()
        .enumerate()
        .fold(
            || vec![0.0f32; du_len],
            |mut du, (s, dxs)| {
                sample(s, dxs, &mut du);
                du
            },
        )
        .reduce_with(add);
    let dw = want_dw.then(|| weight_from_tiles(g, &du.unwrap_or_else(|| vec![0.0; du_len])));
    (want_dx.then_some(dx), dw)
}

fn add(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::kernels;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn geometry(batch: usize, cin: usize, cout: usize, [h, w]: [usize; 2]) -> Geometry {
        Geometry {
            batch,
            cin,
            input: [h, w],
            cout,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [(1, 1); 2],
            dilation: [1, 1],
        }
    }

    /// The forward and both gradients against the im2col kernels (tested against the
    /// definition of the convolution in `kernels`).
    fn check(g: Geometry) {
        let x = values(g.batch * g.cin * g.input[0] * g.input[1], 1);
        let w = values(g.cout * g.cin * 9, 2);
        let bias = values(g.cout, 3);
        let go = values(g.batch * g.cout * g.input[0] * g.input[1], 4);
        let (dx, dw) = backward(&g, &x, &w, &go, [true, true]);
        let ours = [forward(&g, &x, &w, Some(&bias)), dx.unwrap(), dw.unwrap()];
        let theirs = [
            kernels::forward(&g, &x, &w, Some(&bias)),
            kernels::input_grad(&g, &w, &go),
            kernels::weight_grad(&g, &x, &go),
        ];
        crate::cpu::assert_all_close(&["forward", "dx", "dw"], &ours, &theirs, 1e-5);
        let (no_dx, dw_only) = backward(&g, &x, &w, &go, [false, true]);
        assert!(no_dx.is_none());
        crate::cpu::assert_all_close(&["dw alone"], &[dw_only.unwrap()], &theirs[2..], 1e-5);
        let (dx_only, no_dw) = backward(&g, &x, &w, &go, [true, false]);
        assert!(no_dw.is_none());
        crate::cpu::assert_all_close(&["dx alone"], &[dx_only.unwrap()], &theirs[1..2], 1e-5);
    }

    #[test]
    fn transforms_match_the_direct_convolution() {
        // Odd sizes (tiles past the edge), one channel, more samples than threads.
        check(geometry(3, 1, 2, [5, 7]));
        check(geometry(2, 3, 5, [1, 1]));
        check(geometry(4, 4, 3, [6, 4]));
    }

    #[test]
    fn blocks_of_tile_rows_add_up() {
        let g = geometry(2, 64, 64, [32, 31]);
        assert!(blocks(&g).count() > 1, "several blocks");
        check(g);
    }

    #[test]
    fn blocks_of_one_sample_run_in_parallel() {
        // Fewer samples than threads: the forward runs the blocks of each sample in parallel.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let g = geometry(2, 64, 32, [33, 32]);
            assert!(!split_samples(&g) && blocks(&g).count() > 1);
            check(g);
        });
    }

    #[test]
    fn applies_only_to_3x3_stride_1_padding_1_from_16x16() {
        let g = geometry(rayon::current_num_threads(), 16, 8, [16, 16]);
        assert!(applies(&g) && applies_forward(&g));
        assert!(applies(&Geometry { cin: 3, ..g }) && !applies_forward(&Geometry { cin: 3, ..g }));
        let outside = [
            Geometry {
                input: [8, 16],
                ..g
            },
            Geometry {
                stride: [2, 2],
                ..g
            },
            Geometry {
                padding: [(0, 1); 2],
                ..g
            },
            Geometry {
                kernel: [4, 4],
                ..g
            },
            Geometry {
                dilation: [2, 2],
                ..g
            },
        ];
        for other in outside {
            assert!(!applies(&other) && !applies_forward(&other), "{other:?}");
        }
    }
}
