//! The stage-1 objective (the reference's VQLPIPSWithDiscriminator): L1 + LPIPS
//! reconstruction, a PatchGAN generator term weighted adaptively from gradient norms at the
//! decoder's last layer, the quantizer loss, and the discriminator's hinge or vanilla loss.
//!
//! The generator step needs two gradients at the last layer (of the reconstruction loss and
//! of the GAN loss) besides the full backward pass. Both losses depend on the autoencoder only
//! through the reconstruction `rec = conv(h, W)`, so they are evaluated on a detached copy of
//! `rec`: one backward each through LPIPS or the discriminator gives `dL/drec`, the last-layer
//! weight gradients follow from one small convolution backward, and the autoencoder is
//! back-propagated once with the surrogate `sum(rec * dTotal/drec) + codebook_weight * L_q`,
//! whose gradients equal those of the total loss. The reference instead back-propagates
//! LPIPS and the discriminator twice.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, softplus};
use burn::tensor::ops::ConvOptions;
use serde::{Deserialize, Serialize};

use super::discriminator::{DiscriminatorConfig, NLayerDiscriminator};
use super::lpips::{Lpips, LpipsConfig};

/// Which discriminator loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscLoss {
    /// `0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(rec))))`.
    Hinge,
    /// `0.5 * (mean(softplus(-D(x))) + mean(softplus(D(rec))))`.
    Vanilla,
}

/// Loss settings, named as the reference's `lossconfig.params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Step from which the GAN term and discriminator training start.
    pub disc_start: u64,
    /// Weight of the quantizer loss.
    pub codebook_weight: f64,
    /// Stored for compatibility and, as in the reference, never applied.
    pub pixelloss_weight: f64,
    /// Weight of LPIPS in the reconstruction term (0 disables LPIPS).
    pub perceptual_weight: f64,
    /// Factor on the GAN terms once the discriminator is on.
    pub disc_factor: f64,
    /// Scale of the adaptive generator weight.
    pub disc_weight: f64,
    /// Discriminator loss.
    pub disc_loss: DiscLoss,
    /// Whether the discriminator also sees a condition: channels appended to its input
    /// (`discriminator.in_channels` = image channels + condition channels). Stage-1 training
    /// conditions on the sample's one-hot label map (`.seg.png`).
    pub disc_conditional: bool,
    /// Discriminator shape.
    pub discriminator: DiscriminatorConfig,
    /// LPIPS weights; required when `perceptual_weight > 0`.
    pub lpips: Option<LpipsConfig>,
    /// Steps over which the generator's adversarial weight ramps linearly from 0 (at
    /// `disc_start`) to `disc_factor`; the discriminator trains fully from `disc_start` on.
    /// 0: no ramp (the reference).
    pub disc_warmup: u64,
    /// Weight of the LeCam regularizer on the discriminator (Yu et al. 2021): its logits on
    /// real images are pulled towards the running mean of its logits on reconstructions and
    /// the other way round. 0: off (the reference).
    pub lecam_weight: f64,
    /// Decay of the running means the LeCam regularizer anchors to.
    pub lecam_decay: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            disc_start: 10_000,
            codebook_weight: 1.0,
            pixelloss_weight: 1.0,
            perceptual_weight: 1.0,
            disc_factor: 1.0,
            disc_weight: 0.8,
            disc_loss: DiscLoss::Hinge,
            disc_conditional: false,
            discriminator: DiscriminatorConfig::default(),
            lpips: None,
            disc_warmup: 0,
            lecam_weight: 0.0,
            lecam_decay: 0.99,
        }
    }
}

impl LossConfig {
    /// `disc_factor` from `disc_start` on, 0 before (the reference's `adopt_weight`): the
    /// discriminator's factor.
    pub fn disc_factor_at(&self, step: u64) -> f64 {
        if step < self.disc_start {
            0.0
        } else {
            self.disc_factor
        }
    }

    /// The generator's adversarial factor: [`Self::disc_factor_at`], ramped linearly over
    /// `disc_warmup` steps from `disc_start` (the first step gets `1 / disc_warmup` of it).
    pub fn adversarial_factor_at(&self, step: u64) -> f64 {
        let factor = self.disc_factor_at(step);
        if factor == 0.0 || self.disc_warmup == 0 {
            return factor;
        }
        let ramp = (step - self.disc_start + 1) as f64 / self.disc_warmup as f64;
        factor * ramp.min(1.0)
    }
}

/// The running means of the discriminator's logits that the LeCam regularizer anchors to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LeCamAnchors {
    /// Running mean of the logits on real images.
    pub real: f64,
    /// Running mean of the logits on reconstructions.
    pub fake: f64,
}

impl LeCamAnchors {
    /// Moves the means towards this step's `(real, fake)` mean logits with `decay`.
    pub fn update(&mut self, (real, fake): (f64, f64), decay: f64) {
        self.real = decay * self.real + (1.0 - decay) * real;
        self.fake = decay * self.fake + (1.0 - decay) * fake;
    }
}

/// The LeCam regularizer: `mean(relu(D(x) - fake)^2) + mean(relu(real - D(rec))^2)` with
/// the anchors' running means.
pub fn lecam_penalty(real: Tensor<4>, fake: Tensor<4>, anchors: LeCamAnchors) -> Tensor<1> {
    relu(real.sub_scalar(anchors.fake)).powi_scalar(2).mean()
        + relu(fake.neg().add_scalar(anchors.real))
            .powi_scalar(2)
            .mean()
}

/// Loss values of one step, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GeneratorLog {
    /// `nll + d_weight * disc_factor * g_loss + codebook_weight * quant`.
    pub total: f64,
    /// Mean of `|x - rec| + perceptual_weight * lpips`.
    pub nll: f64,
    /// Mean L1.
    pub l1: f64,
    /// Mean LPIPS (0 when off).
    pub p_loss: f64,
    /// `-mean(D(rec))` (0 before `disc_start`).
    pub g_loss: f64,
    /// Adaptive weight times `disc_weight` (0 before `disc_start`).
    pub d_weight: f64,
    /// The GAN factor in force.
    pub disc_factor: f64,
    /// Quantizer loss.
    pub quant: f64,
}

/// What the generator step is computed from.
pub struct GeneratorInputs<'a> {
    /// The real images.
    pub x: Tensor<4>,
    /// The reconstruction, on the autoencoder's graph.
    pub rec: Tensor<4>,
    /// The quantizer loss.
    pub quant: Tensor<1>,
    /// The decoder's last layer, for the adaptive weight.
    pub last: &'a LastLayer,
    /// The discriminator's condition (with `disc_conditional`).
    pub cond: Option<&'a Tensor<4>>,
}

/// What the generator step hands to the optimizer: a scalar whose gradients are those of the
/// total loss, and the loss values.
#[derive(Debug, Clone)]
pub struct GeneratorStep {
    /// Back-propagate this (its value is not the loss; see [`GeneratorLog::total`]).
    pub surrogate: Tensor<1>,
    /// Loss values.
    pub log: GeneratorLog,
}

/// The decoder's last convolution (3x3, stride 1, padding 1): its input and weight.
#[derive(Debug, Clone)]
pub struct LastLayer {
    /// Input of the convolution.
    pub input: Tensor<4>,
    /// Its weight `[out, in, 3, 3]`.
    pub weight: Tensor<4>,
}

/// The stage-1 objective with its (frozen) LPIPS network.
#[derive(Debug)]
pub struct VqLoss {
    /// Settings.
    pub config: LossConfig,
    lpips: Option<Lpips>,
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

impl VqLoss {
    /// The objective; `lpips` must be given when `perceptual_weight > 0`.
    pub fn new(config: LossConfig, lpips: Option<Lpips>) -> Self {
        Self { config, lpips }
    }

    /// Reconstruction term `mean(|x - rec| + perceptual_weight * lpips(x, rec))`, with its
    /// parts (mean L1, mean LPIPS).
    pub fn nll(&self, x: Tensor<4>, rec: Tensor<4>) -> (Tensor<1>, f64, f64) {
        let l1 = (x.clone() - rec.clone()).abs();
        let l1_mean = scalar(l1.clone().mean().detach());
        let pw = self.config.perceptual_weight;
        match (&self.lpips, pw > 0.0) {
            (Some(lpips), true) => {
                let p = lpips.forward(x, rec); // [b, 1, 1, 1]
                let p_mean = scalar(p.clone().mean().detach());
                let per_pixel = l1 + p.mul_scalar(pw);
                (per_pixel.mean(), l1_mean, p_mean)
            }
            _ => (l1.mean(), l1_mean, 0.0),
        }
    }

    /// The discriminator's input: `images`, with the condition's channels appended when the
    /// discriminator is conditional (as the reference, which asserts that a condition is given
    /// exactly when `disc_conditional` is set).
    fn disc_input(&self, images: Tensor<4>, cond: Option<&Tensor<4>>) -> Tensor<4> {
        assert_eq!(
            cond.is_some(),
            self.config.disc_conditional,
            "a condition must be given exactly when loss.disc_conditional is set"
        );
        match cond {
            Some(c) => Tensor::cat(vec![images, c.clone().detach()], 1),
            None => images,
        }
    }

    /// The generator (autoencoder) step at training step `step`.
    pub fn generator(
        &self,
        disc: &NLayerDiscriminator,
        inputs: GeneratorInputs,
        step: u64,
    ) -> GeneratorStep {
        let GeneratorInputs {
            x,
            rec,
            quant,
            last,
            cond,
        } = inputs;
        let cfg = &self.config;
        let leaf = rec.clone().detach().require_grad();
        let (nll, l1, p_loss) = self.nll(x, leaf.clone());
        let nll_value = scalar(nll.clone().detach());
        let grad_nll = leaf.grad(&nll.backward()).expect("reconstruction gradient");
        let disc_factor = cfg.adversarial_factor_at(step);
        let quant_value = scalar(quant.clone().detach());
        let mut log = GeneratorLog {
            nll: nll_value,
            l1,
            p_loss,
            disc_factor,
            quant: quant_value,
            ..Default::default()
        };
        let mut grad_rec = grad_nll.clone();
        if disc_factor > 0.0 {
            let leaf = rec.clone().detach().require_grad();
            // Only dL_G/drec is wanted: a copy of the discriminator whose parameters are not
            // tracked skips their gradients (its BatchNorm statistics are shared and update).
            let g_loss = disc
                .clone()
                .no_grad()
                .forward(self.disc_input(leaf.clone(), cond))
                .mean()
                .neg();
            log.g_loss = scalar(g_loss.clone().detach());
            let grad_g = leaf.grad(&g_loss.backward()).expect("generator gradient");
            log.d_weight = adaptive_weight(last, grad_nll, grad_g.clone()) * cfg.disc_weight;
            grad_rec = grad_rec + grad_g.mul_scalar(log.d_weight * disc_factor);
        }
        log.total =
            nll_value + log.d_weight * disc_factor * log.g_loss + cfg.codebook_weight * quant_value;
        let surrogate = (rec * grad_rec.detach()).sum() + quant.mul_scalar(cfg.codebook_weight);
        GeneratorStep { surrogate, log }
    }

    /// The discriminator loss at `step` on real images and detached reconstructions (each
    /// with `cond` appended when conditional), plus the LeCam term at `anchors` when
    /// `lecam_weight > 0`, with the mean logits on each; `None` before `disc_start`.
    pub fn discriminator(
        &self,
        disc: &NLayerDiscriminator,
        (x, rec): (Tensor<4>, Tensor<4>),
        step: u64,
        cond: Option<&Tensor<4>>,
        anchors: LeCamAnchors,
    ) -> Option<(Tensor<1>, f64, f64)> {
        let factor = self.config.disc_factor_at(step);
        if factor == 0.0 {
            return None;
        }
        let real = disc.forward(self.disc_input(x.detach(), cond));
        let fake = disc.forward(self.disc_input(rec.detach(), cond));
        let (real_mean, fake_mean) = (
            scalar(real.clone().mean().detach()),
            scalar(fake.clone().mean().detach()),
        );
        let loss = match self.config.disc_loss {
            DiscLoss::Hinge => {
                relu(real.clone().neg().add_scalar(1.0)).mean()
                    + relu(fake.clone().add_scalar(1.0)).mean()
            }
            DiscLoss::Vanilla => {
                softplus(real.clone().neg(), 1.0).mean() + softplus(fake.clone(), 1.0).mean()
            }
        };
        let mut loss = loss.mul_scalar(0.5 * factor);
        if self.config.lecam_weight > 0.0 {
            let lecam = lecam_penalty(real, fake, anchors);
            loss = loss + lecam.mul_scalar(self.config.lecam_weight * factor);
        }
        Some((loss, real_mean, fake_mean))
    }
}

/// `|grad_W L_rec| / (|grad_W L_G| + 1e-4)`, clamped to [0, 1e4]; `W` the last layer's weight,
/// each gradient obtained from `dL/drec` by one convolution backward.
fn adaptive_weight(last: &LastLayer, grad_nll: Tensor<4>, grad_g: Tensor<4>) -> f64 {
    let norm = |g: Tensor<4>| {
        let w = last.weight.clone().detach().require_grad();
        let out = taming_kernels::conv::conv2d(
            last.input.clone().detach(),
            w.clone(),
            None,
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
        let grads = (out * g.detach()).sum().backward();
        let gw = w.grad(&grads).expect("weight gradient");
        scalar(gw.powi_scalar(2).sum()).sqrt()
    };
    (norm(grad_nll) / (norm(grad_g) + 1e-4)).clamp(0.0, 1e4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn the_adversarial_factor_ramps_over_the_warmup_and_the_discriminators_does_not() {
        let cfg = LossConfig {
            disc_start: 10,
            disc_factor: 1.0,
            disc_warmup: 4,
            ..LossConfig::default()
        };
        let ramp: Vec<f64> = (9..16).map(|s| cfg.adversarial_factor_at(s)).collect();
        assert_eq!(ramp, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(cfg.disc_factor_at(10), 1.0);
        let off = LossConfig {
            disc_warmup: 0,
            ..cfg
        };
        assert_eq!(off.adversarial_factor_at(10), 1.0);
    }

    #[test]
    fn lecam_pulls_logits_towards_the_other_sides_running_mean() {
        let device = Device::flex();
        let t = |v: [f32; 2]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, 1, 2]), &device)
        };
        let anchors = LeCamAnchors {
            real: 1.0,
            fake: -1.0,
        };
        // relu(D(x) - fake): [0.5 + 1, -2 + 1 -> 0]; relu(real - D(rec)): [1 - 3 -> 0, 1 + 1].
        let r = lecam_penalty(t([0.5, -2.0]), t([3.0, -1.0]), anchors);
        let value = r.into_scalar::<f32>() as f64;
        assert!(
            (value - (1.5f64.powi(2) / 2.0 + 2.0f64.powi(2) / 2.0)).abs() < 1e-6,
            "{value}"
        );
        let mut a = LeCamAnchors::default();
        a.update((2.0, -4.0), 0.75);
        assert_eq!(
            a,
            LeCamAnchors {
                real: 0.5,
                fake: -1.0
            }
        );
    }
}
