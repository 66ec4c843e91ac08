//! The `vqgan` binary's library: its command line ([`cli`]) over `taming-model` and
//! `taming-import`, evaluation on shards ([`eval`]), input images fitted to a model
//! ([`input`]), and sampling from a trained transformer ([`sample`]).

pub mod cli;
pub mod eval;
pub mod input;
pub mod sample;
