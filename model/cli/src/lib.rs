//! The `vqgan` binary's library: its command line ([`cli`]) over `taming-model` and
//! `taming-import`, evaluation on shards ([`eval`]), FID ([`fid`]), input images fitted to a
//! model ([`input`]), and sampling from a trained transformer ([`sample`]).

pub mod cli;
pub mod eval;
pub mod fid;
pub mod input;
pub mod sample;
