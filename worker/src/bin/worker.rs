//! `worker`: runs trainers (see [`taming_worker::cli`]).

use std::process::ExitCode;

use clap::Parser;
use taming_worker::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SAFETY: no other thread runs yet.
    unsafe { cli.export_to_env() };
    let telemetry = cli.telemetry.clone();
    telemetry.main("taming-worker", "info", || {
        run(cli).map(|()| ExitCode::SUCCESS)
    })
}
