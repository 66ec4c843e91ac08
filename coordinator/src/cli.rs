//! The `coordinator` command line: `serve` the cluster (registry, queue, assignments),
//! `launch` a job on it (or, with no `--coordinator`, on a local mini-cluster started for the
//! job), `status`, `cancel` and `certs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::client;
use crate::http::serve_http;
use crate::service::{CoordinatorService, ServeOptions, serve};
use crate::standalone::{StandaloneOptions, launch_local, sibling};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use taming_proto::auth::TOKEN_ENV;
use taming_proto::job::{
    Collective, Conditioning, Device, Job, JobSpec, JobState, Stage, StageJob, TransformerJob,
    VqganJob,
};
use taming_proto::tls::TlsArgs;

/// The command line.
#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "taming-rs coordinator: serve the cluster, launch and follow jobs"
)]
pub struct Cli {
    /// Cluster token (also read from TAMING_CLUSTER_TOKEN).
    #[arg(long, global = true, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    /// Logs and traces.
    pub telemetry: taming_telemetry::TelemetryArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per process: the size of `launch`'s many options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Serve the cluster until interrupted.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:50051")]
        bind: SocketAddr,
        /// Directory where jobs are kept across restarts.
        #[arg(long, default_value = "coordinator-state")]
        state: PathBuf,
        /// Seconds without a heartbeat before a worker is dropped.
        #[arg(long, default_value_t = 10)]
        heartbeat_timeout: u64,
        /// Also serve the status page and /metrics (Prometheus) over HTTP on this address.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Seconds a rank may go without progress (a step, or work such as evaluation
        /// batches; at least 20 of its job's recent step times) before it is taken for hung
        /// and its attempt fails; 0: never.
        #[arg(long, default_value_t = crate::service::DEFAULT_PROGRESS_TIMEOUT_S)]
        progress_timeout: u64,
    },
    /// Run a training job and follow it.
    Launch(LaunchArgs),
    /// Make a cluster CA and a certificate per name (mutual TLS for every service).
    Certs {
        /// Folder for ca.pem, ca.key, NAME.pem, NAME.key and secret.yaml (a Kubernetes Secret).
        #[arg(long)]
        out: PathBuf,
        /// The names the services are reached by (DNS names or IPs; `localhost` also covers
        /// 127.0.0.1 and ::1), one certificate each.
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// List the jobs of a running coordinator.
    Status {
        #[arg(long, default_value = "127.0.0.1:50051")]
        coordinator: String,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job: String,
        #[arg(long, default_value = "127.0.0.1:50051")]
        coordinator: String,
    },
}

// The options of `launch` (its help is the variant's).
#[derive(clap::Args)]
struct LaunchArgs {
    /// What to train.
    #[arg(long, value_enum)]
    stage: Stage,
    /// Ranks (workers) to run on.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Local ranks per node, on the local mini-cluster: each of the --nodes workers runs N
    /// worker processes (`worker --nproc-per-node N`, one per device) and the job has
    /// nodes x N ranks. On a cluster the workers are started that way and --nodes counts ranks.
    #[arg(long, default_value_t = 1, value_name = "N")]
    nproc_per_node: u32,
    /// Fewest ranks to continue with after a worker is lost (default: nodes).
    #[arg(long)]
    min_nodes: Option<u32>,
    /// Training config (YAML); the embedded default when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shards: a directory or object-store prefix with train-*.tar and val-*.tar.
    #[arg(long)]
    data: Option<String>,
    /// Run folder (default: runs/vqgan or runs/transformer).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Dataloader services the ranks stream batches from (comma-separated host:port; a
    /// dead one is replaced by the next). With --coordinator; the local mini-cluster
    /// starts its own (--dataloaders N).
    #[arg(long, value_delimiter = ',')]
    dataloader_addrs: Vec<String>,
    /// Stage 2: the first-stage VQGAN (model directory).
    #[arg(long)]
    vqgan: Option<PathBuf>,
    /// Stage 2: conditioning: none, class or segmentation.
    #[arg(long, value_enum)]
    cond: Option<Conditioning>,
    /// Stage 2: code Parquet from `dataloader precompute-codes` (file or directory);
    /// without it the workers encode --data on the fly.
    #[arg(long)]
    codes: Option<String>,
    /// Stage 2: validation code Parquet.
    #[arg(long)]
    val_codes: Option<String>,
    /// Stage 2: the cond-stage VQGAN (with --cond segmentation).
    #[arg(long)]
    cond_vqgan: Option<PathBuf>,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Also keep the checkpoints in object storage (s3://bucket/run, gs://, az://,
    /// file://): rank 0 uploads each one, and a rank restarted on a machine without the
    /// run folder pulls the latest from there.
    #[arg(long)]
    checkpoint_url: Option<String>,
    /// Device of every rank: cpu, cuda or vulkan.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// How ranks all-reduce gradients (default: nccl on cuda devices, else the TCP ring).
    #[arg(long, value_enum)]
    collective: Option<Collective>,
    /// A running coordinator; without it a local mini-cluster is started for the job.
    #[arg(long)]
    coordinator: Option<String>,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 200)]
    checkpoint_every: u64,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Dataloader services the local mini-cluster starts (0: workers read the shards).
    #[arg(long, default_value_t = 1)]
    dataloaders: usize,
    /// Restarts after failed attempts (a rank's error or panic, a lost worker) before the
    /// job fails, as torchrun's.
    #[arg(long, default_value_t = crate::cluster::DEFAULT_MAX_RESTARTS)]
    max_restarts: u32,
    /// Fail the job when it waits longer than this many seconds for workers.
    #[arg(long, value_name = "SECONDS")]
    placement_timeout: Option<u64>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let token = cli.token;
    let transport = cli.tls.load()?;
    match cli.command {
        Cmd::Serve {
            bind,
            state,
            heartbeat_timeout,
            http,
            progress_timeout,
        } => {
            let tls = transport.server(bind, "the coordinator")?;
            transport.check_token(bind, token.is_some(), "the coordinator")?;
            let service = CoordinatorService::new(ServeOptions {
                state_dir: state,
                heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
                heartbeat_interval: Duration::from_secs(1),
                token,
                progress_timeout: Duration::from_secs(progress_timeout),
                report_save_interval: crate::service::REPORT_SAVE_INTERVAL,
            })?;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("binding {bind}"))?;
            // The line launchers and tests wait for.
            println!("coordinator listening on {}", listener.local_addr()?);
            if let Some(addr) = http {
                let http_listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --http {addr}"))?;
                println!("status page on http://{}", http_listener.local_addr()?);
                tokio::spawn(serve_http(service.clone(), http_listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                }));
            }
            serve(service, listener, tls, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs { out, names, days } => {
            for f in crate::certs::write_certs(&out, &names, days)? {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { coordinator } => {
            let mut c = client::connect(&coordinator, token.as_deref(), &transport).await?;
            for job in client::list(&mut c).await? {
                println!(
                    "{}  step {:>7}  {}",
                    job.job_id,
                    job.step,
                    client::line(&job)
                );
                for f in &job.failures {
                    println!("    {f}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { job, coordinator } => {
            let mut c = client::connect(&coordinator, token.as_deref(), &transport).await?;
            println!("{job}: {}", client::cancel(&mut c, &job).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Launch(launch) => run_launch(launch, token.as_deref(), &transport).await,
    }
}

/// `launch`: the job's spec from the options, run on `--coordinator` or on a local
/// mini-cluster.
async fn run_launch(
    args: LaunchArgs,
    token: Option<&str>,
    transport: &taming_proto::tls::Transport,
) -> Result<ExitCode> {
    if args.stage == Stage::Transformer && args.vqgan.is_none() {
        bail!(
            "--stage transformer needs --vqgan MODEL (a stage-1 model directory, e.g. runs/vqgan/model)"
        );
    }
    check_config(args.stage, args.config.as_deref())?;
    let show = !args.quiet;
    let coordinator = args.coordinator.clone();
    let dataloaders = args.dataloaders;
    let nproc_per_node = args.nproc_per_node;
    if nproc_per_node != 1 && coordinator.is_some() {
        bail!(
            "--nproc-per-node is for the local mini-cluster: on a cluster, start the workers with \
             `worker --nproc-per-node N` and give --nodes the total number of ranks"
        );
    }
    let spec = job_spec(args)?;
    match coordinator {
        Some(addr) => launch_remote(&addr, token, transport, &spec, show).await,
        None => {
            let opts = StandaloneOptions {
                dataloaders,
                show,
                nproc_per_node,
            };
            finish(launch_local(spec, opts).await?)
        }
    }
}

/// The spec `launch` submits: paths made absolute (the workers may run elsewhere), the
/// config read.
fn job_spec(args: LaunchArgs) -> Result<JobSpec> {
    let path_text = |p: Option<PathBuf>| -> Result<Option<String>> {
        p.map(|p| Ok(std::path::absolute(&p)?.to_string_lossy().into_owned()))
            .transpose()
    };
    let config_yaml = match &args.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    let stage_job = match args.stage {
        Stage::Vqgan => StageJob::Vqgan(VqganJob {}),
        Stage::Transformer => StageJob::Transformer(TransformerJob {
            vqgan: path_text(args.vqgan)?.unwrap_or_default(),
            cond: args.cond.unwrap_or(Conditioning::None),
            codes: args.codes.map(absolute_if_local),
            val_codes: args.val_codes.map(absolute_if_local),
            cond_vqgan: path_text(args.cond_vqgan)?,
        }),
    };
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from(match args.stage {
            Stage::Vqgan => "runs/vqgan",
            Stage::Transformer => "runs/transformer",
        })
    });
    if args.nproc_per_node == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let nodes = args
        .nodes
        .checked_mul(args.nproc_per_node)
        .context("--nodes x --nproc-per-node is too large")?;
    Ok(JobSpec {
        config_yaml,
        data: args.data.map(absolute_if_local).unwrap_or_default(),
        out: std::path::absolute(&out)?.to_string_lossy().into_owned(),
        steps: args.steps,
        nodes,
        min_nodes: args.min_nodes.unwrap_or(nodes),
        dataloaders: args.dataloader_addrs,
        collective: args.collective.unwrap_or(match args.device.kind() {
            "cuda" => Collective::Nccl,
            _ => Collective::Ring,
        }),
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        device: args.device,
        checkpoint_url: args.checkpoint_url.map(absolute_if_local),
        max_restarts: Some(args.max_restarts),
        placement_timeout_s: args.placement_timeout.unwrap_or(0),
        stage_job,
    })
}

fn absolute_if_local(data: String) -> String {
    if data.contains("://") {
        return data;
    }
    std::path::absolute(&data)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or(data)
}

async fn launch_remote(
    addr: &str,
    token: Option<&str>,
    transport: &taming_proto::tls::Transport,
    spec: &JobSpec,
    show: bool,
) -> Result<ExitCode> {
    let mut c = client::connect(addr, token, transport).await?;
    let id = client::submit(&mut c, spec).await?;
    eprintln!("submitted {id}");
    finish(client::follow(&mut c, &id, show).await?)
}

fn finish(job: Job) -> Result<ExitCode> {
    println!("{}: {}", job.job_id, client::line(&job));
    if job.state == JobState::Succeeded {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{} {}: {}", job.job_id, job.state, job.message)
    }
}

/// Refuses a config the worker would refuse, before anything starts (needs the `worker`
/// binary beside this one; skipped when it is not there, e.g. on a submit-only machine).
fn check_config(stage: Stage, config: Option<&Path>) -> Result<()> {
    let Ok(worker) = sibling("worker") else {
        return Ok(());
    };
    let mut cmd = Command::new(worker);
    cmd.args(["check-config", "--stage", stage.as_str()]);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().context("running worker check-config")?;
    if !out.status.success() {
        bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .trim_start_matches("error: ")
        );
    }
    Ok(())
}
