//! The `dataloader` binary's library: its command line ([`cli`]) and the code-index
//! precomputation of stage 2 ([`precompute`]), which encodes shards with a VQGAN.

pub mod cli;
pub mod precompute;
