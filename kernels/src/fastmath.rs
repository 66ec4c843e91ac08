//! Arithmetic written so that the compiler vectorizes the CPU kernels' loops: sums over
//! independent lanes (a plain `iter().sum()` of floats is one serial chain of additions) and
//! a branch-free polynomial `exp` (the library's `expf` is a call per element).
//!
//! The kernels that use these are compiled for AVX-512 and AVX2 as well as the baseline and
//! pick one at run time (the `multiversion` crate).

/// Independent accumulators per sum: a multiple of every vector width in use.
pub const LANES: usize = 16;

/// Sum of `values`, added in [`LANES`] independent lanes.
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Sum of `(v - center)^2` over `values`, in [`LANES`] independent lanes.
#[inline(always)]
pub fn squared_deviations(values: &[f32], center: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc += (v - center) * (v - center);
        }
    }
    let rest: f32 = rest.iter().map(|v| (v - center) * (v - center)).sum();
    lanes.iter().sum::<f32>() + rest
}

/// `e^x` within about 2 ulp for finite `x` (Cephes' `expf` polynomial after a range
/// reduction by ln 2); saturates below -87 and above 88, where `e^x` leaves the normal range.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `1 / (1 + e^-z)`.
#[inline(always)]
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (ours, theirs) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - theirs) / theirs).abs());
            x += 0.001_37;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_equal_serial_sums() {
        for len in [0, 1, 15, 16, 17, 100, 1027] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 4.5).collect();
            let serial: f64 = values.iter().map(|&v| v as f64).sum();
            assert!((sum(&values) as f64 - serial).abs() < 1e-3, "len {len}");
            let squares: f64 = values.iter().map(|&v| (v as f64 - 0.25).powi(2)).sum();
            let ours = squared_deviations(&values, 0.25) as f64;
            assert!(
                (ours - squares).abs() < 1e-3 * squares.max(1.0),
                "len {len}"
            );
        }
    }
}
