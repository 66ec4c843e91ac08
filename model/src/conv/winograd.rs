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

use multiversion::multiversion;
use rayon::prelude::*;

use super::kernels::{Geometry, Matrix, gemm_f32, split_samples, with_scratch};

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

/// The 1-d transforms, each applied along the rows and then the columns of a tile.
mod one_d {
    /// `Bᵀ d`: the input transform.
    #[inline(always)]
    pub fn bt([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }

    /// `B v`: the input transform's adjoint.
    #[inline(always)]
    pub fn b([v0, v1, v2, v3]: [f32; 4]) -> [f32; 4] {
        [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]
    }

    /// `Aᵀ m`: the output transform.
    #[inline(always)]
    pub fn at([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }

    /// `A y`: the output transform's adjoint.
    #[inline(always)]
    pub fn a([y0, y1]: [f32; 2]) -> [f32; 4] {
        [y0, y0 + y1, y0 - y1, -y1]
    }

    /// `G g`: the weight transform.
    #[inline(always)]
    pub fn g([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
        let (even, odd) = (0.5 * (g0 + g2), 0.5 * g1);
        [g0, even + odd, even - odd, g2]
    }

    /// `Gᵀ u`: the weight transform's adjoint.
    #[inline(always)]
    pub fn gt([u0, u1, u2, u3]: [f32; 4]) -> [f32; 3] {
        let (sum, diff) = (0.5 * (u1 + u2), 0.5 * (u1 - u2));
        [u0 + sum, diff, sum + u3]
    }
}

/// Applies `f` along the rows and then along the columns of an `R x R` tile, giving `S x S`.
#[inline(always)]
fn two_d<const R: usize, const S: usize>(
    t: [[f32; R]; R],
    f: impl Fn([f32; R]) -> [f32; S],
) -> [[f32; S]; S] {
    let mut rows = [[0.0; S]; R];
    for r in 0..R {
        rows[r] = f(t[r]);
    }
    let mut out = [[0.0; S]; S];
    for j in 0..S {
        let mut column = [0.0; R];
        for r in 0..R {
            column[r] = rows[r][j];
        }
        let column = f(column);
        for i in 0..S {
            out[i][j] = column[i];
        }
    }
    out
}

/// `U[ξ][co][ci]` from the weight (`cout x cin x 3 x 3`).
fn weight_tiles(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let len = g.cout * g.cin;
    let mut u = vec![0.0f32; stacked(len)];
    for (k, taps) in w.chunks_exact(9).enumerate() {
        let t: [[f32; 3]; 3] = std::array::from_fn(|r| std::array::from_fn(|c| taps[r * 3 + c]));
        for (xi, v) in two_d(t, one_d::g).as_flattened().iter().enumerate() {
            u[at_xi(xi, len) + k] = *v;
        }
    }
    u
}

/// The weight gradient (`cout x cin x 3 x 3`) from `dU[ξ][ci][co]`.
fn weight_from_tiles(g: &Geometry, du: &[f32]) -> Vec<f32> {
    let len = g.cout * g.cin;
    let mut dw = vec![0.0f32; len * 9];
    for (k, taps) in dw.chunks_exact_mut(9).enumerate() {
        let at = (k % g.cin) * g.cout + k / g.cin;
        let t: [[f32; 4]; 4] =
            std::array::from_fn(|r| std::array::from_fn(|c| du[at_xi(r * 4 + c, len) + at]));
        taps.copy_from_slice(two_d(t, one_d::gt).as_flattened());
    }
    dw
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

/// Even and odd columns (`tw + 1` each) of padded row `py` of a plane (`[h, w]`): padded
/// column `k` is input column `k - 1`, zero outside the image.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn split_row(plane: &[f32], [h, w]: [usize; 2], py: usize, even: &mut [f32], odd: &mut [f32]) {
    if py == 0 || py > h {
        even.fill(0.0);
        odd.fill(0.0);
        return;
    }
    let row = &plane[(py - 1) * w..][..w];
    let pairs = w / 2;
    // input column 2k is padded column 2k + 1 (odd[k]); 2k + 1 is 2k + 2 (even[k + 1])
    let (odd_pairs, even_pairs) = (&mut odd[..pairs], &mut even[1..=pairs]);
    for ((o, e), v) in odd_pairs
        .iter_mut()
        .zip(even_pairs)
        .zip(row.chunks_exact(2))
    {
        *o = v[0];
        *e = v[1];
    }
    even[0] = 0.0;
    even[pairs + 1..].fill(0.0);
    if w % 2 == 1 {
        odd[pairs] = row[w - 1];
        odd[pairs + 1..].fill(0.0);
    } else {
        odd[pairs..].fill(0.0);
    }
}

/// The start of channel `c`'s tiles at position ξ in a stack of `16 x channels x n`.
fn stream(xi: usize, channels: usize, n: usize, c: usize) -> usize {
    at_xi(xi, channels * n) + c * n
}

/// The 16 streams of one channel's tiles in a stack: position ξ of tile `k` at
/// `first + ξ * stride + k`, for `len` tiles.
#[derive(Clone, Copy)]
struct Streams {
    first: usize,
    stride: usize,
    len: usize,
}

impl Streams {
    /// Channel `c`'s tiles `t0..t0 + len` in a stack of `16 x channels x n`.
    fn of(channels: usize, n: usize, c: usize, t0: usize, len: usize) -> Self {
        Self {
            first: stream(0, channels, n, c) + t0,
            stride: channels * n + SKEW,
            len,
        }
    }

    /// Panics unless every stream lies inside a buffer of `buf_len` floats.
    fn check(&self, buf_len: usize) {
        assert!(self.first + (XI - 1) * self.stride + self.len <= buf_len);
    }

    /// Position ξ of tile `k`.
    #[inline(always)]
    fn at(&self, xi: usize, k: usize) -> usize {
        self.first + xi * self.stride + k
    }
}

/// `buf[i]` without a bounds check.
///
/// # Safety
/// `i < buf.len()`.
#[inline(always)]
unsafe fn get(buf: &[f32], i: usize) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { *buf.get_unchecked(i) }
}

/// `buf[i] = v` without a bounds check.
///
/// # Safety
/// `i < buf.len()`.
#[inline(always)]
unsafe fn put(buf: &mut [f32], i: usize, v: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { *buf.get_unchecked_mut(i) = v }
}

/// The 16 transformed streams of one tile row (`f` along both axes of each tile) from `R`
/// padded rows split into even and odd columns (`tw + 1` each, one row after the other),
/// reading padded columns `2k + FIRST..` for tile `k`.
#[inline(always)]
fn tile_row<const R: usize, const FIRST: usize>(
    [even, odd]: [&[f32]; 2],
    f: impl Fn([f32; R]) -> [f32; 4],
    out: &mut [f32],
    s: Streams,
) {
    let tw = s.len;
    assert!(even.len() >= R * (tw + 1) && odd.len() >= R * (tw + 1) && FIRST + R <= 4);
    s.check(out.len());
    for k in 0..tw {
        let mut d = [[0.0f32; R]; R];
        for (a, row) in d.iter_mut().enumerate() {
            let at = a * (tw + 1) + k;
            for (b, val) in row.iter_mut().enumerate() {
                let q = FIRST + b;
                let half = if q.is_multiple_of(2) { even } else { odd };
                // SAFETY: at + q / 2 <= a (tw + 1) + tw - 1 + 1 < R (tw + 1), checked above.
                *val = unsafe { get(half, at + q / 2) };
            }
        }
        for (xi, val) in two_d(d, &f).as_flattened().iter().enumerate() {
            // SAFETY: inside the streams, checked above.
            unsafe { put(out, s.at(xi, k), *val) };
        }
    }
}

/// Tile `k` of the streams `s` of `src`.
///
/// # Safety
/// The streams must lie inside `src` ([`Streams::check`]) and `k < s.len`.
#[inline(always)]
unsafe fn tile_at(src: &[f32], s: Streams, k: usize) -> [[f32; 4]; 4] {
    let mut tile = [[0.0f32; 4]; 4];
    for (xi, val) in tile.as_flattened_mut().iter_mut().enumerate() {
        // SAFETY: forwarded from the caller.
        *val = unsafe { get(src, s.at(xi, k)) };
    }
    tile
}

/// `V = Bᵀ d B` of one tile row from its four padded input rows (padded columns `2k..`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn input_row(rows: [&[f32]; 2], v: &mut [f32], s: Streams) {
    tile_row::<4, 0>(rows, one_d::bt, v, s);
}

/// `dM = A dY Aᵀ` of one tile row from its two output rows (padded columns `2k + 1..`).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn output_grad_row(rows: [&[f32]; 2], dm: &mut [f32], s: Streams) {
    tile_row::<2, 1>(rows, one_d::a, dm, s);
}

/// `Y = Aᵀ M A + bias` of one tile row: two output rows of `2 tw` values into `rows`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn output_row(m: &[f32], s: Streams, bias: f32, rows: &mut [f32]) {
    let tw = s.len;
    assert!(rows.len() >= 4 * tw);
    s.check(m.len());
    for k in 0..tw {
        // SAFETY: inside the streams, checked above.
        let tile = unsafe { tile_at(m, s, k) };
        let [[y00, y01], [y10, y11]] = two_d(tile, one_d::at);
        // SAFETY: 2 tw + 2k + 1 < 4 tw, checked above.
        unsafe {
            put(rows, 2 * k, y00 + bias);
            put(rows, 2 * k + 1, y01 + bias);
            put(rows, 2 * tw + 2 * k, y10 + bias);
            put(rows, 2 * tw + 2 * k + 1, y11 + bias);
        }
    }
}

/// `B dV Bᵀ` of one tile row into `d`: 16 rows of `tw` values, row `4a + b` holding padded
/// row `a` and column `b` of each tile.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn input_grad_row(dv: &[f32], s: Streams, d: &mut [f32]) {
    let tw = s.len;
    assert!(d.len() >= XI * tw);
    s.check(dv.len());
    for k in 0..tw {
        // SAFETY: inside the streams, checked above.
        let tile = unsafe { tile_at(dv, s, k) };
        for (xi, val) in two_d(tile, one_d::b).as_flattened().iter().enumerate() {
            // SAFETY: xi * tw + k < 16 tw, checked above.
            unsafe { put(d, xi * tw + k, *val) };
        }
    }
}

/// `V[ξ][c][t]` (`16 x channels x block.len()`) of the 4x4 input tiles of one sample
/// (`channels x h x w`), zero outside the image.
fn input_tiles(g: &Geometry, x: &[f32], block: Block, v: &mut [f32]) {
    tiles_of::<4>((x, g.cin), g.input, block, 0, input_row, v);
}

/// The transformed tiles (`16 x channels x block.len()`) of one sample's planes (`channels x
/// h x w`) through `row`, from `R` padded rows per tile row, starting at padded row
/// `2 ty + first`.
fn tiles_of<const R: usize>(
    (planes, channels): (&[f32], usize),
    [h, w]: [usize; 2],
    block: Block,
    first: usize,
    row: fn([&[f32]; 2], &mut [f32], Streams),
    out: &mut [f32],
) {
    let (n, tw) = (block.len(), block.tw);
    let mut rows = vec![0.0f32; 2 * R * (tw + 1)];
    for c in 0..channels {
        let plane = &planes[c * h * w..][..h * w];
        for r in 0..block.rows {
            let ty = block.first_row + r;
            let (even, odd) = rows.split_at_mut(R * (tw + 1));
            let halves = even.chunks_mut(tw + 1).zip(odd.chunks_mut(tw + 1));
            for (a, (e, o)) in halves.enumerate() {
                split_row(plane, [h, w], 2 * ty + first + a, e, o);
            }
            row([even, odd], out, Streams::of(channels, n, c, r * tw, tw));
        }
    }
}

/// Writes `Y = Aᵀ M A` (+ bias) of `M[ξ][co][t]` into `y`: output rows `first_row..` of one
/// sample (`cout x rows x w`).
fn output_tiles(
    g: &Geometry,
    m: &[f32],
    block: Block,
    bias: Option<&[f32]>,
    (y, first_row): (&mut [f32], usize),
) {
    let [h, w] = g.input;
    let (cs, n, tw) = (g.cout, block.len(), block.tw);
    let rows_here = y.len() / (cs * w);
    let mut rows = vec![0.0f32; 4 * tw];
    for c in 0..cs {
        let b = bias.map_or(0.0, |b| b[c]);
        let plane = &mut y[c * rows_here * w..][..rows_here * w];
        for r in 0..block.rows {
            let ty = block.first_row + r;
            output_row(m, Streams::of(cs, n, c, r * tw, tw), b, &mut rows);
            for (i, row) in rows.chunks_exact(2 * tw).enumerate() {
                let oy = 2 * ty + i;
                if oy < h {
                    plane[(oy - first_row) * w..][..w].copy_from_slice(&row[..w]);
                }
            }
        }
    }
}

/// `dM[ξ][co][t] = A dY Aᵀ` of one sample's output gradient (`cout x h x w`), zero beyond it:
/// output row (column) `2t + i` is padded row (column) `2t + i + 1`.
fn output_grad_tiles(g: &Geometry, dy: &[f32], block: Block, dm: &mut [f32]) {
    tiles_of::<2>((dy, g.cout), g.input, block, 1, output_grad_row, dm);
}

/// Adds `B dV Bᵀ` of `dV[ξ][ci][t]` into one sample's input gradient (`cin x h x w`).
fn add_input_grad_tiles(g: &Geometry, dv: &[f32], block: Block, dx: &mut [f32]) {
    let [h, w] = g.input;
    let (cs, n, tw) = (g.cin, block.len(), block.tw);
    let (mut d, mut sums) = (vec![0.0f32; XI * tw], vec![0.0f32; 2 * tw]);
    for c in 0..cs {
        let plane = &mut dx[c * h * w..][..h * w];
        for r in 0..block.rows {
            let ty = block.first_row + r;
            input_grad_row(dv, Streams::of(cs, n, c, r * tw, tw), &mut d);
            for a in 0..4 {
                let py = 2 * ty + a;
                if py == 0 || py > h {
                    continue;
                }
                let row = &mut plane[(py - 1) * w..][..w];
                let col = |b: usize| &d[(4 * a + b) * tw..][..tw];
                add_padded_row(row, [col(0), col(1), col(2), col(3)], &mut sums);
            }
        }
    }
}

/// Adds to an input row the values of padded columns `2k + b` given per `b` (`tw` each),
/// through `sums` (`2 tw`): padded column `p` is input column `p - 1`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_padded_row(row: &mut [f32], [c0, c1, c2, c3]: [&[f32]; 4], sums: &mut [f32]) {
    let tw = c0.len();
    let (c1, c2, c3) = (&c1[..tw], &c2[..tw], &c3[..tw]);
    let sums = &mut sums[..2 * tw];
    // input column 2k (padded 2k + 1) gets c1[k] + c3[k - 1]; 2k + 1 (padded 2k + 2) gets
    // c2[k] + c0[k + 1]
    for k in 1..tw.saturating_sub(1) {
        sums[2 * k] = c1[k] + c3[k - 1];
        sums[2 * k + 1] = c2[k] + c0[k + 1];
    }
    for k in [0, tw - 1] {
        sums[2 * k] = c1[k] + if k > 0 { c3[k - 1] } else { 0.0 };
        sums[2 * k + 1] = c2[k] + if k + 1 < tw { c0[k + 1] } else { 0.0 };
    }
    row.iter_mut().zip(sums.iter()).for_each(|(r, v)| *r += v);
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
    let du = if want_dx {
        dx.par_chunks_mut(ci * plane)
            .enumerate()
            .fold(
                || vec![0.0f32; du_len],
                |mut du, (s, dxs)| {
                    sample(s, dxs, &mut du);
                    du
                },
            )
            .reduce_with(add)
    } else {
        (0..g.batch)
            .into_par_iter()
            .fold(
                || vec![0.0f32; du_len],
                |mut du, s| {
                    sample(s, &mut [], &mut du);
                    du
                },
            )
            .reduce_with(add)
    };
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
        assert!(!applies(&Geometry {
            input: [8, 16],
            ..g
        }));
        assert!(!applies(&Geometry {
            stride: [2, 2],
            ..g
        }));
        assert!(!applies(&Geometry {
            padding: [(0, 1); 2],
            ..g
        }));
        assert!(!applies(&Geometry {
            kernel: [4, 4],
            ..g
        }));
        assert!(!applies(&Geometry {
            dilation: [2, 2],
            ..g
        }));
    }
}
