//! GroupNorm with its affine transform and an optional swish, forward and backward, in one
//! pass per (sample, group) over f32 slices of shape `batch x channels x positions`.

use rayon::prelude::*;

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
fn stats(values: &[f32], epsilon: f32) -> (f32, f32) {
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + epsilon).sqrt())
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// `swish?(gamma * (x - mean) * rstd + beta)` per group.
pub fn forward(s: &Shape, x: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .enumerate()
        .for_each(|(task, (out, x))| {
            let (mean, rstd) = stats(x, s.epsilon);
            let c0 = s.first_channel(task);
            for ((out, x), c) in out
                .chunks_mut(s.positions)
                .zip(x.chunks(s.positions))
                .zip(c0..)
            {
                let (scale, shift) = (gamma[c] * rstd, beta[c] - gamma[c] * rstd * mean);
                for (o, v) in out.iter_mut().zip(x) {
                    let z = v * scale + shift;
                    *o = if s.swish { z * sigmoid(z) } else { z };
                }
            }
        });
    out
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
    for (c, ((dx, x), dy)) in dx
        .chunks_mut(s.positions)
        .zip(x.chunks(s.positions))
        .zip(dy.chunks(s.positions))
        .enumerate()
    {
        let (mut dg, mut db) = (0.0f32, 0.0f32);
        for ((dx, v), g) in dx.iter_mut().zip(x).zip(dy) {
            let xhat = (v - mean) * rstd;
            let dz = if s.swish {
                let z = gamma[c] * xhat + beta[c];
                let sg = sigmoid(z);
                g * sg * (1.0 + z * (1.0 - sg))
            } else {
                *g
            };
            dg += dz * xhat;
            db += dz;
            *dx = dz;
        }
        dgamma[c] = dg;
        dbeta[c] = db;
        sum_dxhat += gamma[c] * db;
        sum_dxhat_xhat += gamma[c] * dg;
    }
    // Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    let n = x.len() as f32;
    let (m1, m2) = (sum_dxhat / n, sum_dxhat_xhat / n);
    for (c, (dx, x)) in dx
        .chunks_mut(s.positions)
        .zip(x.chunks(s.positions))
        .enumerate()
    {
        for (d, v) in dx.iter_mut().zip(x) {
            let xhat = (v - mean) * rstd;
            *d = rstd * (gamma[c] * *d - m1 - xhat * m2);
        }
    }
    (dgamma, dbeta)
}
