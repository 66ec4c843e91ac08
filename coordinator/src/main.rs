//! `coordinator`: serve the cluster, launch and follow jobs (see [`taming_coordinator::cli`]).
//! Computes nothing and does not link burn.

use std::process::ExitCode;

use clap::Parser;
use taming_coordinator::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = cli.telemetry.clone();
    telemetry.main("taming-coordinator", "warn", || {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        rt.block_on(run(cli))
    })
}
