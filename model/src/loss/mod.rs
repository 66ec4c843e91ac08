//! The stage-1 training objectives: LPIPS, the PatchGAN discriminator and the VQGAN loss, and
//! the segmentation objective's cross-entropy.

pub mod discriminator;
pub mod lpips;
pub mod segmentation;
pub mod vqperceptual;

pub use discriminator::{DiscriminatorConfig, NLayerDiscriminator};
pub use lpips::{Lpips, LpipsConfig};
pub use segmentation::bce_with_logits;
pub use vqperceptual::{
    DiscLoss, GeneratorInputs, GeneratorLog, GeneratorStep, LastLayer, LeCamAnchors, LossConfig,
    VqLoss, lecam_penalty,
};
