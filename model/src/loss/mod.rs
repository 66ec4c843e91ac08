//! The stage-1 training objective: LPIPS, the PatchGAN discriminator and the VQGAN loss.

pub mod discriminator;
pub mod lpips;
pub mod vqperceptual;

pub use discriminator::{DiscriminatorConfig, NLayerDiscriminator};
pub use lpips::{Lpips, LpipsConfig};
pub use vqperceptual::{DiscLoss, GeneratorLog, GeneratorStep, LastLayer, LossConfig, VqLoss};
