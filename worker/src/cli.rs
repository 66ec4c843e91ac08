//! The `worker` command line. `worker --coordinator ADDR` joins a cluster and runs the jobs
//! the coordinator assigns; `worker train --stage vqgan` trains on its own (with no other
//! arguments: the small default on the embedded Fashion-MNIST shards); `worker train --stage
//! transformer --vqgan MODEL` trains stage 2 over that VQGAN's codes.

use std::path::{Path, PathBuf};

use crate::agent::{AgentOptions, run_agent};
use crate::defaults::{parse_config, parse_stage2_config};
use crate::plan::{JobInputs, JobPlan, default_out};
use crate::settings::{DEFAULT_PREFETCH, RunSettings};
use crate::stage2::CondKind;
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use taming_model::device::DeviceSpec;
use taming_proto::auth::TOKEN_ENV;
use taming_proto::job::Stage;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "taming-rs worker: runs training jobs"
)]
pub struct Cli {
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: taming_telemetry::TelemetryArgs,
    #[command(flatten)]
    tls: taming_proto::tls::TlsArgs,
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
    /// Address peers reach the ring at, `host:port` (a DNS name or an IP; default: the bound
    /// address).
    #[arg(long, value_parser = host_port)]
    advertise: Option<String>,
    /// CPU threads for compute, named compute-N (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Training batches made ahead on a background thread while a step runs: decoded from
    /// the shards, or received from dataloader services (0: inside the step).
    #[arg(long, default_value_t = DEFAULT_PREFETCH)]
    prefetch: usize,
    /// Device for the jobs this worker runs (with --coordinator): cpu, cuda:N or vulkan:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Serve Prometheus metrics at http://ADDR/metrics (with --coordinator): throughput and
    /// step time split into data wait, compute and all-reduce.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Seconds a rank waits on a ring peer (joining, sending, receiving) before the attempt
    /// fails.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    collective_timeout: u64,
    /// Local ranks (with --coordinator): one worker process per device, registered as
    /// NAME-0 .. NAME-(N-1), on cuda:0 .. cuda:N-1 (or the ordinals after --device), ring and
    /// metrics ports the given ones plus the local rank, the cores shared out.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

// Parsed once per process: the size of `train`'s many options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Parse and check a training config (the embedded default when none is given), then exit.
    CheckConfig {
        /// Which stage's config.
        #[arg(long, value_enum, default_value = "vqgan")]
        stage: Stage,
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
        /// Run folder (default: runs/vqgan or runs/transformer).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        stage2: Stage2Args,
        /// Total optimizer steps.
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Continue the run in --out from its latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Also keep the checkpoints in object storage (s3://bucket/run, gs://, az://,
        /// file://); --resume pulls the latest from there when --out lacks it.
        #[arg(long)]
        checkpoint_url: Option<String>,
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

/// Stage-2 inputs.
#[derive(clap::Args)]
struct Stage2Args {
    /// The first-stage VQGAN (model directory) whose codes the transformer learns.
    #[arg(long)]
    vqgan: Option<PathBuf>,
    /// Conditioning: none, class or segmentation.
    #[arg(long, default_value = "none")]
    cond: CondKind,
    /// Code Parquet from `dataloader precompute-codes` (file or directory with
    /// _manifest.json); without it the images of --data are encoded on the fly.
    #[arg(long)]
    codes: Option<String>,
    /// Validation code Parquet (default: a tenth of the --codes rows, at most 64, held out of
    /// training).
    #[arg(long)]
    val_codes: Option<String>,
    /// The cond-stage VQGAN (with --cond segmentation).
    #[arg(long)]
    cond_vqgan: Option<PathBuf>,
}

impl Cli {
    /// Puts the token and TLS files given as flags into the environment, where the
    /// dataloader client finds them.
    ///
    /// # Safety
    /// No other thread may run (the environment is not synchronized): call it first in `main`.
    pub unsafe fn export_to_env(&self) {
        if let Some(token) = &self.token {
            unsafe { std::env::set_var(TOKEN_ENV, token) };
        }
        for (k, v) in self.tls.env() {
            unsafe { std::env::set_var(k, v) };
        }
    }
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(nproc) = cli.nproc_per_node {
        return run_node(cli, nproc);
    }
    compute_threads(cli.threads)?;
    crate::failpoint::configured().map_err(anyhow::Error::msg)?;
    let command = match (cli.command, cli.coordinator) {
        (Some(c), None) => c,
        (None, Some(coordinator)) => {
            return run_agent(AgentOptions {
                coordinator,
                name: cli.name,
                token: cli.token,
                ring_bind: cli.ring_bind,
                advertise: cli.advertise,
                collective_timeout: std::time::Duration::from_secs(cli.collective_timeout),
                device: cli.device,
                metrics_bind: cli.metrics,
                prefetch: cli.prefetch,
                transport: cli.tls.load()?,
            });
        }
        (Some(_), Some(_)) => {
            bail!("--coordinator joins a cluster; it does not go with a subcommand")
        }
        (None, None) => bail!("give --coordinator ADDR (join a cluster) or a subcommand (train)"),
    };
    if let Command::CheckConfig { stage, config } = &command {
        let (text, name) = config_text(config.as_deref())?;
        match stage {
            Stage::Vqgan => parse_config(&text, &name).map(|_| ())?,
            Stage::Transformer => parse_stage2_config(&text, &name).map(|_| ())?,
        }
        return Ok(());
    }
    let Command::Train {
        stage,
        config,
        data,
        dataloader,
        out,
        steps,
        resume,
        checkpoint_url,
        nodes,
        device,
        eval_every,
        checkpoint_every,
        quiet,
        stage2,
    } = command
    else {
        unreachable!("check-config returned above");
    };
    let (config_yaml, config_name) = config_text(config.as_deref())?;
    let plan = JobPlan::new(JobInputs {
        stage,
        config_yaml,
        config_name,
        data,
        dataloaders: dataloader,
        vqgan: stage2.vqgan,
        cond: stage2.cond,
        cond_vqgan: stage2.cond_vqgan,
        codes: stage2.codes,
        val_codes: stage2.val_codes,
    })?;
    let device = device.device().map_err(anyhow::Error::msg)?.autodiff();
    let out = out.unwrap_or_else(|| default_out(stage));
    let mut settings = RunSettings::single(out.clone(), steps, device);
    settings.resume = resume;
    settings.checkpoint_url = checkpoint_url;
    settings.eval_every = eval_every;
    settings.checkpoint_every = checkpoint_every;
    settings.nodes = nodes;
    settings.prefetch = cli.prefetch;
    let summary = plan.run(settings, None, !quiet)?;
    let outputs = match stage {
        Stage::Vqgan => "metrics.csv, loss.png and val_grid.png",
        Stage::Transformer => "metrics.csv, loss.png and samples.png",
    };
    println!(
        "trained {} steps: validation {:.4} -> {:.4}; {} samples skipped; model in {}; {outputs} in {}",
        summary.steps,
        summary.first_val,
        summary.last_val,
        summary.skipped,
        summary.model_dir.display(),
        out.display()
    );
    Ok(())
}

/// `--nproc-per-node`: the node's local ranks, each a worker process of its own.
fn run_node(cli: Cli, nproc: usize) -> Result<()> {
    let (Some(coordinator), None) = (&cli.coordinator, &cli.command) else {
        bail!("--nproc-per-node goes with --coordinator and no subcommand");
    };
    let mut common: Vec<std::ffi::OsString> = vec![
        "--coordinator".into(),
        coordinator.into(),
        "--prefetch".into(),
        cli.prefetch.to_string().into(),
        "--collective-timeout".into(),
        cli.collective_timeout.to_string().into(),
    ];
    if cli.telemetry.log_json {
        common.push("--log-json".into());
    }
    if let Some(endpoint) = &cli.telemetry.otlp_endpoint {
        common.extend(["--otlp-endpoint".into(), endpoint.into()]);
    }
    crate::local_ranks::run_node(crate::local_ranks::NodeOptions {
        nproc,
        name: cli.name,
        device: cli.device,
        ring_bind: cli.ring_bind,
        advertise: cli.advertise,
        metrics: cli.metrics,
        threads: cli.threads,
        common_args: common,
    })
}

/// The config file's text and name; empty for the embedded default.
fn config_text(path: Option<&Path>) -> Result<(String, String)> {
    let Some(path) = path else {
        return Ok((String::new(), String::new()));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// `--advertise`: an address peers can dial.
fn host_port(addr: &str) -> Result<String, String> {
    taming_proto::host_port(addr).map(|_| addr.to_string())
}

/// The compute thread pool: `threads` threads (default: one per core), named `compute-N`
/// so that `top -H` and profilers tell them from the I/O and prefetch threads.
fn compute_threads(threads: Option<usize>) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|i| format!("compute-{i}"))
        .build_global()
        .context("setting --threads")
}
