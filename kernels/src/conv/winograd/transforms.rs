//! The transforms of [`super`]: the 1-d maps and their adjoints, and their application to
//! the weight and, a tile row at a time over streams of neighbouring tiles (so that they
//! vectorize), to the input, the output and their gradients.

use multiversion::multiversion;

use super::{Block, Geometry, SKEW, XI, at_xi, stacked};

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
pub(super) fn weight_tiles(g: &Geometry, w: &[f32]) -> Vec<f32> {
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
pub(super) fn weight_from_tiles(g: &Geometry, du: &[f32]) -> Vec<f32> {
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
pub(super) fn input_tiles(g: &Geometry, x: &[f32], block: Block, v: &mut [f32]) {
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
pub(super) fn output_tiles(
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
pub(super) fn output_grad_tiles(g: &Geometry, dy: &[f32], block: Block, dm: &mut [f32]) {
    tiles_of::<2>((dy, g.cout), g.input, block, 1, output_grad_row, dm);
}

/// Adds `B dV Bᵀ` of `dV[ξ][ci][t]` into one sample's input gradient (`cin x h x w`).
pub(super) fn add_input_grad_tiles(g: &Geometry, dv: &[f32], block: Block, dx: &mut [f32]) {
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
