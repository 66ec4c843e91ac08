//! taming-rs models: the networks, their losses and the project's model format, with no data
//! loading, command line or PyTorch reader (those are `taming-dataloader`, `taming-model-cli`
//! and `taming-import`; the CPU kernels are `taming-kernels`).
//!
//! - [`vqgan`]: the stage-1 VQGAN (encoder, `quant_conv`, quantizer, `post_quant_conv`,
//!   decoder), configured by [`config`];
//! - [`quantize`]: the vector and Gumbel quantizers and codebook maintenance (EMA, k-means,
//!   dead-code restart);
//! - [`loss`]: LPIPS, the PatchGAN discriminator, the VQGAN loss with its adaptive weight, and
//!   the segmentation objective's cross-entropy;
//! - [`transformer`]: the stage-2 GPT, its conditioning layout, token orders, KV-cached and
//!   sliding-window sampling; [`synthesis`]: images from a transformer and its VQGAN(s);
//! - [`checkpoint`]: the native model format and filling a module from named tensors;
//! - [`inception`], [`fid`]: pytorch-fid's Inception-v3 and the Fréchet distance;
//! - [`image_io`], [`codes`], [`metrics`], [`device`], [`atomic`], [`error`]: images and code
//!   grids in and out, reconstruction metrics, device selection, atomic writes, errors.

pub mod atomic;
pub mod checkpoint;
pub mod codes;
pub mod config;
pub mod device;
pub mod error;
pub mod fid;
pub mod image_io;
pub mod inception;
pub mod loss;
pub mod metrics;
pub mod quantize;
pub mod synthesis;
pub mod transformer;
pub mod vqgan;

pub use config::{DdConfig, QuantizerConfig, VectorQuantizerConfig, VqganConfig};
pub use error::ModelError;
pub use vqgan::Vqgan;
