//! `dataloader`: serve ready batches over gRPC, pack image folders into WebDataset shards,
//! and precompute the code-index Parquet of stage 2 (see [`taming_dataloader_cli::cli`]).

use std::process::ExitCode;

use clap::Parser;
use taming_dataloader_cli::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = cli.telemetry.clone();
    telemetry.main("taming-dataloader", "info", || {
        run(cli).map(|()| ExitCode::SUCCESS)
    })
}
