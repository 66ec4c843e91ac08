//! `worker`: runs trainers. `worker train --stage vqgan` trains a VQGAN on local shards; with
//! no arguments it trains the small default on the embedded Fashion-MNIST shards.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use taming_model::device::DeviceSpec;
use taming_worker::stage1::{RunOptions, Stage1Config, run_stage1};

/// The embedded default config (configs/stage1/fashion_mnist.yaml).
const DEFAULT_CONFIG: &str = include_str!("../../../configs/stage1/fashion_mnist.yaml");
/// Where the embedded default data lives in a checkout.
const DEFAULT_DATA: &str = "data/fashion-mnist";

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "taming-rs worker: runs training jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    /// Stage 1: the VQGAN.
    Vqgan,
}

#[derive(Subcommand)]
enum Command {
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
    } = cli.command;
    let config = read_config(config.as_deref())?;
    let data = match data {
        Some(dir) => dir,
        None => default_data()?.to_string_lossy().into_owned(),
    };
    let device = device.device().map_err(anyhow::Error::msg)?.autodiff();
    let summary = run_stage1(RunOptions {
        config,
        data,
        dataloaders: dataloader,
        out: out.clone(),
        steps,
        resume,
        eval_every,
        checkpoint_every,
        keep: 2,
        nodes,
        device,
        progress: !quiet,
    })?;
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
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_CONFIG.to_string(),
            "the embedded default config".to_string(),
        ),
    };
    let config: Stage1Config = serde_yaml::from_str(&text)
        .with_context(|| format!("{name}: not a valid stage-1 config"))?;
    config
        .validate()
        .with_context(|| format!("{name}: refused"))?;
    Ok(config)
}

/// `data/fashion-mnist` under the current directory, else in the checkout this was built from.
fn default_data() -> Result<PathBuf> {
    let here = PathBuf::from(DEFAULT_DATA);
    if here.is_dir() {
        return Ok(here);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_DATA);
    if checkout.is_dir() {
        return Ok(checkout);
    }
    bail!(
        "no --data given and the embedded data ({DEFAULT_DATA}) is not here; run from the repository root"
    )
}
