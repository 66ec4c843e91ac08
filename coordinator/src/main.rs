//! `coordinator`: launches training jobs. Today `launch` runs a job on this machine by
//! starting a `worker` process (found beside this binary, or at `$TAMING_WORKER_BIN`);
//! the cluster service (registry, queue, multi-node groups) comes with the distributed
//! runtime. This binary computes nothing and does not link burn.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "taming-rs coordinator: launch and follow training jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// Stage 1: the VQGAN.
    Vqgan,
    /// Stage 2: the latent transformer.
    Transformer,
}

#[derive(Subcommand)]
enum Cmd {
    /// Launch a training job and follow it to the end.
    Launch {
        /// What to train.
        #[arg(long, value_enum)]
        stage: Stage,
        /// Nodes (worker processes) for the job.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Training config (YAML); the embedded default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory of train-*.tar and val-*.tar shards; the embedded default when absent.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run folder.
        #[arg(long, default_value = "runs/vqgan")]
        out: PathBuf,
        /// Total optimizer steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Continue the run in --out from its latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Device for the workers: cpu, cuda:N or vulkan:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let Cmd::Launch {
        stage,
        nodes,
        config,
        data,
        out,
        steps,
        resume,
        device,
    } = cli.command;
    if stage == Stage::Transformer {
        bail!(
            "--stage transformer: stage-2 training is not available yet (it follows the distributed runtime)"
        );
    }
    if nodes != 1 {
        bail!(
            "--nodes {nodes}: multi-node jobs need the distributed runtime, which is not built yet; use --nodes 1"
        );
    }
    let worker = worker_binary()?;
    let mut cmd = Command::new(&worker);
    cmd.args([
        "train", "--stage", "vqgan", "--nodes", "1", "--device", &device,
    ]);
    cmd.arg("--out").arg(&out);
    if let Some(c) = &config {
        cmd.arg("--config").arg(c);
    }
    if let Some(d) = &data {
        cmd.arg("--data").arg(d);
    }
    if let Some(s) = steps {
        cmd.args(["--steps", &s.to_string()]);
    }
    if resume {
        cmd.arg("--resume");
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", worker.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => bail!("the worker was killed by a signal"),
    })
}

/// `$TAMING_WORKER_BIN`, else `worker` beside this executable.
fn worker_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TAMING_WORKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating this executable")?;
    let worker = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if !worker.is_file() {
        bail!(
            "{} not found: build it with `cargo build -p taming-worker` (same profile), or set TAMING_WORKER_BIN",
            worker.display()
        );
    }
    Ok(worker)
}
