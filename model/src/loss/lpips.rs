//! LPIPS (Zhang et al. 2018) with a VGG16 trunk, as the `lpips` package and the reference
//! compute it: scaling layer, VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and
//! relu5_3, unit-normalized over channels, squared differences, a 1x1 linear head per tap,
//! spatial mean, summed over taps.
//!
//! Weights come from the files users have: torchvision's VGG16 `.pth` (`features.N.*`) and
//! the heads file `weights/v0.1/vgg.pth` of the `lpips` package (the reference's `vgg.pth`,
//! `linK.model.1.weight`). Fewer than five stages can be used (for small test fixtures).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use taming_kernels::conv;

use crate::checkpoint::fill_from;
use crate::checkpoint::tensors::RawTensor;
use crate::error::ModelError;

/// Input and output channels of VGG16's convolutions, by stage.
const VGG16_STAGES: [&[[usize; 2]]; 5] = [
    &[[3, 64], [64, 64]],
    &[[64, 128], [128, 128]],
    &[[128, 256], [256, 256], [256, 256]],
    &[[256, 512], [512, 512], [512, 512]],
    &[[512, 512], [512, 512], [512, 512]],
];

/// The `lpips` package's name for a head parameter (`0.weight` -> `lin0.model.1.weight`).
fn head_name(path: &str) -> String {
    let (k, rest) = path.split_once('.').unwrap_or((path, ""));
    format!("lin{k}.model.1.{rest}")
}

/// Index in torchvision's `vgg16().features` of each stage's first convolution.
const TORCHVISION_OFFSETS: [usize; 5] = [0, 5, 10, 17, 24];

/// Where the LPIPS weights are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LpipsConfig {
    /// torchvision's VGG16 weights (e.g. `vgg16-397923af.pth`).
    pub vgg16: PathBuf,
    /// The LPIPS linear heads (`lpips/weights/v0.1/vgg.pth`, or the reference's `vgg.pth`).
    pub heads: PathBuf,
    /// VGG stages (taps) used, 1 to 5; LPIPS proper uses 5.
    #[serde(default = "five")]
    pub stages: usize,
}

fn five() -> usize {
    5
}

/// One VGG16 stage: (max-pool unless first), then convolutions each followed by ReLU.
#[derive(Module, Debug)]
pub struct VggStage {
    conv: Vec<Conv2d>,
}

/// LPIPS with frozen weights.
#[derive(Module, Debug)]
pub struct Lpips {
    stages: Vec<VggStage>,
    lins: Vec<Conv2d>,
}

impl Lpips {
    /// An LPIPS network with `stages` taps and default-initialized weights.
    pub fn new(stages: usize, device: &Device) -> Self {
        let stages_cfg = &VGG16_STAGES[..stages.clamp(1, 5)];
        let stages_mod = stages_cfg
            .iter()
            .map(|convs| VggStage {
                conv: convs
                    .iter()
                    .map(|&c| {
                        Conv2dConfig::new(c, [3, 3])
                            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                            .init(device)
                    })
                    .collect(),
            })
            .collect();
        let lins = stages_cfg
            .iter()
            .map(|convs| {
                let channels = convs[convs.len() - 1][1];
                Conv2dConfig::new([channels, 1], [1, 1])
                    .with_bias(false)
                    .init(device)
            })
            .collect();
        Self {
            stages: stages_mod,
            lins,
        }
    }

    /// Loads the trunk and heads named by `config`, each file's state dict read by
    /// `read_state_dict` (`taming_import::read_state_dict` for PyTorch files); errors name
    /// the file and tensor.
    pub fn load_with(
        config: &LpipsConfig,
        device: &Device,
        read_state_dict: impl Fn(&Path) -> Result<BTreeMap<String, RawTensor>, ModelError>,
    ) -> Result<Self, ModelError> {
        if !(1..=5).contains(&config.stages) {
            return Err(ModelError::Config {
                key: "lpips.stages".into(),
                reason: format!("{} is outside 1..=5", config.stages),
            });
        }
        let mut trunk = Self::new(config.stages, device);
        let vgg16 = read_state_dict(&config.vgg16)?;
        fill_from(&mut trunk.stages, vgg16, torchvision_name, &config.vgg16)?;
        let heads = read_state_dict(&config.heads)?;
        fill_from(&mut trunk.lins, heads, head_name, &config.heads)?;
        Ok(trunk.no_grad())
    }

    /// Perceptual distance between image batches in [-1, 1], `[b, 1, 1, 1]`.
    pub fn forward(&self, x0: Tensor<4>, x1: Tensor<4>) -> Tensor<4> {
        // One trunk pass per batch: a batch that needs no gradient (the real images in
        // training) then records nothing for the backward pass.
        let taps = self.features(scale(x0)).into_iter();
        let taps = taps.zip(self.features(scale(x1)));
        let mut total: Option<Tensor<4>> = None;
        for ((a, z), lin) in taps.zip(&self.lins) {
            let (a, z) = (unit_normalize(a), unit_normalize(z));
            let d = conv::forward(lin, (a - z).powi_scalar(2))
                .mean_dim(2)
                .mean_dim(3);
            total = Some(match total {
                Some(t) => t + d,
                None => d,
            });
        }
        total.expect("at least one stage")
    }

    fn features(&self, x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut taps = Vec::with_capacity(self.stages.len());
        let mut h = x;
        for (i, stage) in self.stages.iter().enumerate() {
            if i > 0 {
                h = max_pool2d(h, MaxPoolOptions::new([2, 2]));
            }
            for c in &stage.conv {
                h = relu(conv::forward(c, h));
            }
            taps.push(h.clone());
        }
        taps
    }
}

/// torchvision's name for one of our trunk paths (`0.conv.1.weight` -> `features.2.weight`).
fn torchvision_name(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        [stage, "conv", conv, param] => {
            let (s, c): (usize, usize) = (stage.parse().unwrap_or(0), conv.parse().unwrap_or(0));
            format!("features.{}.{param}", TORCHVISION_OFFSETS[s.min(4)] + 2 * c)
        }
        _ => path.to_string(),
    }
}

/// The LPIPS scaling layer: `(x - shift) / scale` per channel.
fn scale(x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let shift = Tensor::<4>::from_data(
        TensorData::new(vec![-0.030f32, -0.088, -0.188], [1, 3, 1, 1]),
        &device,
    );
    let scale = Tensor::<4>::from_data(
        TensorData::new(vec![0.458f32, 0.448, 0.450], [1, 3, 1, 1]),
        &device,
    );
    (x - shift) / scale
}

/// `x / (|x|_channels + 1e-10)`.
fn unit_normalize(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm.add_scalar(1e-10)
}

/// Whether `path` exists, for a clear error before any work.
pub fn check_files(config: &LpipsConfig) -> Result<(), ModelError> {
    for (key, path) in [
        ("lpips.vgg16", &config.vgg16),
        ("lpips.heads", &config.heads),
    ] {
        if !Path::new(path).is_file() {
            return Err(ModelError::Config {
                key: key.into(),
                reason: format!("{} is not a readable file", path.display()),
            });
        }
    }
    Ok(())
}
