//! taming-rs models: the stage-1 VQGAN (encoder, quantizers, decoder), the stage-2
//! transformer (GPT, conditioning, sampling), reference checkpoint import and the project's
//! own model format.

pub mod atomic;
pub mod checkpoint;
pub mod codes;
pub mod config;
pub mod device;
pub mod error;
pub mod image_io;
pub mod loss;
pub mod metrics;
pub mod quantize;
pub mod synthesis;
pub mod transformer;
pub mod vqgan;

pub use config::{DdConfig, QuantizerConfig, VectorQuantizerConfig, VqganConfig};
pub use error::ModelError;
pub use vqgan::Vqgan;
