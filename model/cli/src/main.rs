//! `vqgan`: import reference checkpoints, encode images to codes, decode codes, reconstruct,
//! evaluate, sample (see [`taming_model_cli::cli`]).

use std::process::ExitCode;

use clap::Parser;
use taming_model_cli::cli::{Cli, run};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
