//! `worker`: runs trainers. `worker --coordinator ADDR` joins a cluster and runs the jobs
//! the coordinator assigns; `worker train --stage vqgan` trains on its own (with no other
//! arguments: the small default on the embedded Fashion-MNIST shards).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use taming_model::device::DeviceSpec;
use taming_proto::auth::TOKEN_ENV;
use taming_worker::agent::{AgentOptions, run_agent};
use taming_worker::defaults::{default_data, parse_config};
use taming_worker::stage1::{RunOptions, Stage1Config, run_stage1};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "taming-rs worker: runs training jobs"
)]
struct Cli {
    /// Join the cluster of this coordinator and run its assignments.
    #[arg(long)]
    coordinator: Option<String>,
    /// Name shown in the coordinator's registry.
    #[arg(long, default_value = "worker")]
    name: String,
    /// Cluster token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// Address the all-reduce ring listens on.
    #[arg(long, default_value = "127.0.0.1:0")]
    ring_bind: std::net::SocketAddr,
    /// Address peers reach the ring at (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// CPU threads for compute (default: all).
    #[arg(long)]
    threads: Option<usize>,
    /// Device for the jobs this worker runs (with --coordinator): cpu, cuda:N or vulkan:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    /// Stage 1: the VQGAN.
    Vqgan,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check a training config (the embedded default when none is given), then exit.
    CheckConfig {
        /// Training config (YAML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train locally (one process).
    Train {
        /// What to train.
        #[arg(long, value_enum, default_value = "vqgan")]
        stage: Stage,
        /// Training config (YAML); the embedded Fashion-MNIST default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory or object-store prefix (s3://bucket/prefix) of train-*.tar and
        /// val-*.tar shards.
        #[arg(long)]
        data: Option<String>,
        /// Stream training batches from these dataloader services (comma-separated
        /// host:port; a dead one is replaced by the next).
        #[arg(long, value_delimiter = ',')]
        dataloader: Vec<String>,
        /// Run folder.
        #[arg(long, default_value = "runs/vqgan")]
        out: PathBuf,
        /// Total optimizer steps.
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Continue the run in --out from its latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Nodes the learning rate is scaled for.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Device: cpu, cuda:N or vulkan:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Evaluate every N steps.
        #[arg(long, default_value_t = 100)]
        eval_every: u64,
        /// Checkpoint every N steps.
        #[arg(long, default_value_t = 200)]
        checkpoint_every: u64,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(t) = cli.threads {
        rayon_threads(t)?;
    }
    let command = match (cli.command, cli.coordinator) {
        (Some(c), None) => c,
        (None, Some(coordinator)) => {
            return run_agent(AgentOptions {
                coordinator,
                name: cli.name,
                token: cli.token,
                ring_bind: cli.ring_bind,
                advertise: cli.advertise,
                collective_timeout: std::time::Duration::from_secs(300),
                device: cli.device,
            });
        }
        (Some(_), Some(_)) => {
            bail!("--coordinator joins a cluster; it does not go with a subcommand")
        }
        (None, None) => bail!("give --coordinator ADDR (join a cluster) or a subcommand (train)"),
    };
    if let Command::CheckConfig { config } = &command {
        read_config(config.as_deref())?;
        return Ok(());
    }
    let Command::Train {
        stage: Stage::Vqgan,
        config,
        data,
        dataloader,
        out,
        steps,
        resume,
        nodes,
        device,
        eval_every,
        checkpoint_every,
        quiet,
    } = command
    else {
        unreachable!("check-config returned above");
    };
    let config = read_config(config.as_deref())?;
    let data = match data {
        Some(dir) => dir,
        None => default_data()?.to_string_lossy().into_owned(),
    };
    let device = device.device().map_err(anyhow::Error::msg)?.autodiff();
    let mut opts = RunOptions::single(config, data, out.clone(), steps, device);
    opts.dataloaders = dataloader;
    opts.resume = resume;
    opts.eval_every = eval_every;
    opts.checkpoint_every = checkpoint_every;
    opts.nodes = nodes;
    opts.progress = !quiet;
    let summary = run_stage1(opts)?;
    println!(
        "trained {} steps: validation L1 {:.4} -> {:.4}; {} samples skipped; model in {}; metrics, loss.png and val_grid.png in {}",
        summary.steps,
        summary.first_val_l1,
        summary.last_val_l1,
        summary.skipped,
        summary.model_dir.display(),
        out.display()
    );
    Ok(())
}

fn read_config(path: Option<&Path>) -> Result<Stage1Config> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            parse_config(&text, &p.display().to_string())
        }
        None => parse_config("", ""),
    }
}

fn rayon_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("setting --threads")
}
