//! Reconstruction metrics on images in [-1, 1]: L1, PSNR and SSIM (Wang et al. 2004: 11x11
//! Gaussian window with sigma 1.5, no padding, C1 = 0.01^2, C2 = 0.03^2, data range 1), each
//! averaged over images (SSIM over channels too).

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

/// Per-image mean absolute error, `[b]`.
pub fn l1(x: Tensor<4>, y: Tensor<4>) -> Vec<f64> {
    per_image((x - y).abs())
}

/// Per-image PSNR in dB with both images mapped to [0, 1].
pub fn psnr(x: Tensor<4>, y: Tensor<4>) -> Vec<f64> {
    let mse = per_image((x - y).mul_scalar(0.5).powi_scalar(2));
    mse.into_iter()
        .map(|m| 10.0 * (1.0 / m.max(1e-12)).log10())
        .collect()
}

/// Per-image SSIM with both images mapped to [0, 1] (mean over channels and positions).
pub fn ssim(x: Tensor<4>, y: Tensor<4>) -> Vec<f64> {
    let [_, c, h, w] = x.dims();
    assert!(h >= 11 && w >= 11, "SSIM needs images of at least 11x11");
    let (x, y) = (
        x.add_scalar(1.0).mul_scalar(0.5),
        y.add_scalar(1.0).mul_scalar(0.5),
    );
    let window = gaussian_window(c, &x.device());
    let blur = |t: Tensor<4>| {
        conv2d(
            t,
            window.clone(),
            None,
            ConvOptions::new([1, 1], [0, 0], [1, 1], c),
        )
    };
    let (mx, my) = (blur(x.clone()), blur(y.clone()));
    let sxx = blur(x.clone() * x.clone()) - mx.clone() * mx.clone();
    let syy = blur(y.clone() * y.clone()) - my.clone() * my.clone();
    let sxy = blur(x * y) - mx.clone() * my.clone();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let num = (mx.clone() * my.clone()).mul_scalar(2.0).add_scalar(c1)
        * sxy.mul_scalar(2.0).add_scalar(c2);
    let den = (mx.clone() * mx + my.clone() * my).add_scalar(c1) * (sxx + syy).add_scalar(c2);
    per_image(num / den)
}

/// Reconstruction quality over a set of images, accumulated batch by batch: the per-image
/// means of L1, PSNR and SSIM with the reconstructions clamped to [-1, 1] (as the reference
/// logs them), and the share of the codebook the images' codes use.
#[derive(Debug, Clone)]
pub struct Reconstructions {
    l1: Vec<f64>,
    psnr: Vec<f64>,
    ssim: Vec<f64>,
    used: Vec<bool>,
}

/// What [`Reconstructions`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconstructionReport {
    /// Images measured.
    pub images: usize,
    /// Mean L1.
    pub l1: f64,
    /// Mean PSNR (dB).
    pub psnr: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// Codes used at least once, over the codebook's size.
    pub usage: f64,
    /// Codes used at least once.
    pub codes_used: usize,
}

impl Reconstructions {
    /// Nothing measured yet, for a codebook of `n_embed` codes.
    pub fn new(n_embed: usize) -> Self {
        Self {
            l1: Vec::new(),
            psnr: Vec::new(),
            ssim: Vec::new(),
            used: vec![false; n_embed],
        }
    }

    /// Adds a batch: inputs `x`, reconstructions `rec` (clamped here), and the codes used.
    pub fn add(&mut self, x: Tensor<4>, rec: Tensor<4>, codes: &[i64]) {
        let rec = rec.clamp(-1.0, 1.0);
        self.l1.extend(l1(x.clone(), rec.clone()));
        self.psnr.extend(psnr(x.clone(), rec.clone()));
        self.ssim.extend(ssim(x, rec));
        for &code in codes {
            if let Some(u) = usize::try_from(code)
                .ok()
                .and_then(|c| self.used.get_mut(c))
            {
                *u = true;
            }
        }
    }

    /// The means over every image added.
    pub fn report(&self) -> ReconstructionReport {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let codes_used = self.used.iter().filter(|u| **u).count();
        ReconstructionReport {
            images: self.l1.len(),
            l1: mean(&self.l1),
            psnr: mean(&self.psnr),
            ssim: mean(&self.ssim),
            usage: codes_used as f64 / self.used.len().max(1) as f64,
            codes_used,
        }
    }
}

fn gaussian_window(channels: usize, device: &burn::tensor::Device) -> Tensor<4> {
    let g: Vec<f64> = (0..11)
        .map(|i| (-((i as f64 - 5.0).powi(2)) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let total: f64 = g.iter().sum();
    let mut k = Vec::with_capacity(channels * 121);
    for _ in 0..channels {
        for a in &g {
            for b in &g {
                k.push((a * b / (total * total)) as f32);
            }
        }
    }
    Tensor::from_data(TensorData::new(k, [channels, 1, 11, 11]), device)
}

fn per_image(t: Tensor<4>) -> Vec<f64> {
    let [b, c, h, w] = t.dims();
    let means = t.reshape([b, c * h * w]).mean_dim(1);
    means
        .try_into_vec_as::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn identical_images_score_perfectly() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &device);
        assert!(
            ssim(x.clone(), x.clone())
                .iter()
                .all(|s| (s - 1.0).abs() < 1e-5)
        );
        assert!(l1(x.clone(), x.clone()).iter().all(|v| *v == 0.0));
        assert!(psnr(x.clone(), x).iter().all(|p| *p >= 100.0));
    }

    #[test]
    fn reconstructions_clamp_and_average_over_images_and_count_codes() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([2, 3, 16, 16], &device);
        let mut r = Reconstructions::new(8);
        // Reconstructions of 3.0 are clamped to 1.0: L1 1, PSNR 10 log10(1 / 0.25).
        r.add(x.clone(), x.clone().add_scalar(3.0), &[1, 1, 5]);
        r.add(x.clone().narrow(0, 0, 1), x.narrow(0, 0, 1), &[9, -1]);
        let rep = r.report();
        assert_eq!(rep.images, 3);
        assert!((rep.l1 - 2.0 / 3.0).abs() < 1e-6, "{rep:?}");
        let expected_psnr = (2.0 * 10.0 * 4f64.log10() + 10.0 * 1e12f64.log10()) / 3.0;
        assert!((rep.psnr - expected_psnr).abs() < 1e-3, "{rep:?}");
        assert_eq!((rep.codes_used, rep.usage), (2, 0.25));
    }

    #[test]
    fn psnr_of_a_constant_offset_is_exact_and_ssim_drops_with_noise() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 3, 16, 16], &device);
        // An offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB.
        let p = psnr(x.clone(), x.clone().add_scalar(0.2))[0];
        assert!((p - 20.0).abs() < 1e-3, "{p}");
        let img = Tensor::<4>::random([1, 3, 16, 16], Distribution::Uniform(-1.0, 1.0), &device);
        let noisy =
            img.clone() + Tensor::random([1, 3, 16, 16], Distribution::Normal(0.0, 0.5), &device);
        let s = ssim(img, noisy)[0];
        assert!(s < 0.9 && s > -1.0, "{s}");
    }
}
