//! Stage 2: the latent transformer. A GPT ([`gpt`]) over VQGAN codes, conditioned as the
//! reference's Net2NetTransformer ([`layout`]: SOS token, class label or cond-stage codes,
//! prepended in their own token range), token orders ([`permuter`]), sampling with a KV
//! cache ([`sample`]) and sliding-window synthesis of grids larger than the window
//! ([`window`]).

pub mod config;
pub mod gpt;
pub mod layout;
pub mod permuter;
pub mod sample;
pub mod window;

pub use config::{Conditioning, GptConfig, PermuterKind, TransformerConfig};
pub use gpt::{Gpt, KvCache};
pub use layout::{Cond, TokenLayout, TrainBatch};
pub use sample::{Sampling, sample_window};
pub use window::{GridCond, WindowMode, sample_grid};
