//! The PatchGAN discriminator of pix2pix as the reference uses it (NLayerDiscriminator):
//! 4x4 convolutions, strides 2 for the first `n_layers` then 1, 1; BatchNorm and
//! LeakyReLU(0.2) between; conv weights N(0, 0.02), BatchNorm weights N(1, 0.02).
//! Checkpoint names follow the reference's `main.N` sequence.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use taming_kernels::conv;

/// Discriminator shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscriminatorConfig {
    /// Input channels (3, or 3 + condition channels when conditional).
    pub in_channels: usize,
    /// Filters of the first layer.
    pub ndf: usize,
    /// Strided layers after the first.
    pub n_layers: usize,
}

impl Default for DiscriminatorConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            ndf: 64,
            n_layers: 3,
        }
    }
}

/// PatchGAN discriminator: a map of real/fake logits.
#[derive(Module, Debug)]
pub struct NLayerDiscriminator {
    convs: Vec<Conv2d>,
    norms: Vec<BatchNorm>,
}

fn conv(cin: usize, cout: usize, stride: usize, bias: bool, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [4, 4])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(bias)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        })
        .init(device)
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels)
        .with_epsilon(1e-5)
        .with_momentum(0.1)
        .init(device);
    bn.gamma = Param::from_tensor(Tensor::random(
        [channels],
        Distribution::Normal(1.0, 0.02),
        device,
    ));
    bn
}

impl NLayerDiscriminator {
    /// A discriminator initialized as the reference's `weights_init`.
    pub fn new(cfg: &DiscriminatorConfig, device: &Device) -> Self {
        let mut convs = vec![conv(cfg.in_channels, cfg.ndf, 2, true, device)];
        let mut norms = Vec::new();
        let mut mult = 1;
        for n in 1..=cfg.n_layers {
            let prev = mult;
            mult = (1 << n).min(8);
            let stride = if n < cfg.n_layers { 2 } else { 1 };
            convs.push(conv(cfg.ndf * prev, cfg.ndf * mult, stride, false, device));
            norms.push(batch_norm(cfg.ndf * mult, device));
        }
        convs.push(conv(cfg.ndf * mult, 1, 1, true, device));
        Self { convs, norms }
    }

    /// Logits `[b, 1, h', w']` for images `[b, in_channels, h, w]`. BatchNorm uses batch
    /// statistics (and updates its running averages) on an autodiff device in training mode.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = leaky_relu(conv::forward(&self.convs[0], x), 0.2);
        for (c, norm) in self.convs[1..].iter().zip(&self.norms) {
            h = leaky_relu(norm.forward(conv::forward(c, h)), 0.2);
        }
        conv::forward(&self.convs[self.convs.len() - 1], h)
    }

    /// Folds pending running-statistics updates in, so that saving or evaluating sees the
    /// latest values (burn applies the last update lazily).
    pub fn sync_running_stats(&self) {
        for norm in &self.norms {
            norm.running_mean.value_sync();
            norm.running_var.value_sync();
        }
    }

    /// Running mean and variance of BatchNorm `i`.
    pub fn running_stats(&self, i: usize) -> (Tensor<1>, Tensor<1>) {
        let norm = &self.norms[i];
        (
            norm.running_mean.value_sync(),
            norm.running_var.value_sync(),
        )
    }
}

/// The reference's name for one of our discriminator paths: convolution `i` is `main.0` for
/// the first, then `main.{3i-1}`; BatchNorm `i` is `main.{3i+3}` (gamma/beta as weight/bias).
pub fn reference_name(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    let (kind, index, param) = match parts.as_slice() {
        [kind, index, param] => (*kind, index.parse::<usize>().unwrap_or(0), *param),
        _ => return path.to_string(),
    };
    let param = match param {
        "gamma" => "weight",
        "beta" => "bias",
        other => other,
    };
    let main = match (kind, index) {
        ("convs", 0) => 0,
        ("convs", i) => 3 * i - 1,
        (_, i) => 3 * i + 3,
    };
    format!("main.{main}.{param}")
}

#[cfg(test)]
mod tests {
    use super::reference_name;

    #[test]
    fn names_follow_the_reference_sequence() {
        assert_eq!(reference_name("convs.0.weight"), "main.0.weight");
        assert_eq!(reference_name("convs.1.weight"), "main.2.weight");
        assert_eq!(reference_name("norms.0.gamma"), "main.3.weight");
        assert_eq!(reference_name("norms.1.running_var"), "main.6.running_var");
        assert_eq!(reference_name("convs.4.bias"), "main.11.bias");
    }
}
