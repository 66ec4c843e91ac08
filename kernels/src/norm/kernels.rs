//! GroupNorm with its affine transform and an optional swish, forward and backward, in one
//! pass per (sample, group) over f32 slices of shape `batch x channels x positions`.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::fastmath::{self, LANES};

/// Shape of one group normalization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Samples.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Positions per channel (height x width).
    pub positions: usize,
    /// Groups of consecutive channels normalized together.
    pub groups: usize,
    /// Added to the variance.
    pub epsilon: f32,
    /// Whether swish (`z * sigmoid(z)`) follows the affine transform.
    pub swish: bool,
}

impl Shape {
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.positions
    }

    fn first_channel(&self, task: usize) -> usize {
        (task % self.groups) * (self.channels / self.groups)
    }
}

/// Mean and 1/sqrt(var + eps) of one group's values.
#[inline(always)]
fn stats(values: &[f32], epsilon: f32) -> (f32, f32) {
    let n = values.len() as f32;
    let mean = fastmath::sum(values) / n;
    let var = fastmath::squared_deviations(values, mean) / n;
    (mean, 1.0 / (var + epsilon).sqrt())
}

/// `swish?(gamma * (x - mean) * rstd + beta)` per group.
pub fn forward(s: &Shape, x: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let cpg = s.channels / s.groups;
    out.par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .enumerate()
        .for_each(|(task, (out, x))| {
            let c = s.first_channel(task)..s.first_channel(task) + cpg;
            group_forward(s, x, &gamma[c.clone()], &beta[c], out);
        });
    out
}

/// One (sample, group) of [`forward`].
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn group_forward(s: &Shape, x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [f32]) {
    let (mean, rstd) = stats(x, s.epsilon);
    let channels = out.chunks_mut(s.positions).zip(x.chunks(s.positions));
    for ((out, x), (g, b)) in channels.zip(gamma.iter().zip(beta)) {
        let (scale, shift) = (g * rstd, b - g * rstd * mean);
        let affine = out.iter_mut().zip(x);
        if s.swish {
            affine.for_each(|(o, v)| *o = swish(v * scale + shift));
        } else {
            affine.for_each(|(o, v)| *o = v * scale + shift);
        }
    }
}

#[inline(always)]
fn swish(z: f32) -> f32 {
    z * fastmath::sigmoid(z)
}

/// Gradients for x, gamma and beta from the output gradient `dy`.
pub fn backward(
    s: &Shape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let cpg = s.channels / s.groups;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .zip(dy.par_chunks(s.group_len()))
        .enumerate()
        .map(|(task, ((dx, x), dy))| {
            let c0 = s.first_channel(task);
            group_backward(s, x, &gamma[c0..c0 + cpg], &beta[c0..c0 + cpg], dy, dx)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f32; s.channels], vec![0.0f32; s.channels]);
    for (task, (dg, db)) in partials.into_iter().enumerate() {
        let c0 = s.first_channel(task);
        dg.iter().zip(&mut dgamma[c0..]).for_each(|(p, t)| *t += p);
        db.iter().zip(&mut dbeta[c0..]).for_each(|(p, t)| *t += p);
    }
    (dx, dgamma, dbeta)
}

/// One (sample, group): writes `dx` and returns this group's partial dgamma and dbeta.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn group_backward(
    s: &Shape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let (mean, rstd) = stats(x, s.epsilon);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; gamma.len()], vec![0.0f32; gamma.len()]);
    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0.0f32, 0.0f32);
    // Pass 1: dz (the gradient before swish) into dx, the parameters' gradients, the sums.
    let channels = dx
        .chunks_mut(s.positions)
        .zip(x.chunks(s.positions))
        .zip(dy.chunks(s.positions));
    for (c, ((dx, x), dy)) in channels.enumerate() {
        let affine = Affine {
            mean,
            rstd,
            gamma: gamma[c],
            beta: beta[c],
        };
        let (dg, db) = if s.swish {
            channel_backward::<true>(&affine, x, dy, dx)
        } else {
            channel_backward::<false>(&affine, x, dy, dx)
        };
        dgamma[c] = dg;
        dbeta[c] = db;
        sum_dxhat += gamma[c] * db;
        sum_dxhat_xhat += gamma[c] * dg;
    }
    // Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    let n = x.len() as f32;
    let (m1, m2) = (sum_dxhat / n, sum_dxhat_xhat / n);
    let channels = dx.chunks_mut(s.positions).zip(x.chunks(s.positions));
    for ((dx, x), g) in channels.zip(gamma) {
        for (d, v) in dx.iter_mut().zip(x) {
            let xhat = (v - mean) * rstd;
            *d = rstd * (g * *d - m1 - xhat * m2);
        }
    }
    (dgamma, dbeta)
}

/// One channel's normalization: `z = gamma * (x - mean) * rstd + beta`.
struct Affine {
    mean: f32,
    rstd: f32,
    gamma: f32,
    beta: f32,
}

/// Writes `dz` (the gradient of the affine output, before the swish when `SWISH`) into `dx`
/// and returns `(sum(dz * xhat), sum(dz))`, accumulated in independent lanes.
#[inline(always)]
fn channel_backward<const SWISH: bool>(
    a: &Affine,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> (f32, f32) {
    let one = |v: f32, g: f32| {
        let xhat = (v - a.mean) * a.rstd;
        let dz = if SWISH {
            let z = a.gamma * xhat + a.beta;
            let sg = fastmath::sigmoid(z);
            g * sg * (1.0 + z * (1.0 - sg))
        } else {
            g
        };
        (dz, xhat)
    };
    let (mut dg, mut db) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut chunks = dx.chunks_exact_mut(LANES);
    let (mut xs, mut gs) = (x.chunks_exact(LANES), dy.chunks_exact(LANES));
    for ((dx, x), g) in (&mut chunks).zip(&mut xs).zip(&mut gs) {
        for i in 0..LANES {
            let (dz, xhat) = one(x[i], g[i]);
            dg[i] += dz * xhat;
            db[i] += dz;
            dx[i] = dz;
        }
    }
    let rest = chunks.into_remainder().iter_mut();
    for ((dx, v), g) in rest.zip(xs.remainder()).zip(gs.remainder()) {
        let (dz, xhat) = one(*v, *g);
        dg[0] += dz * xhat;
        db[0] += dz;
        *dx = dz;
    }
    (dg.iter().sum(), db.iter().sum())
}
