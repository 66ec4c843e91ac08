//! `coordinator`: `serve` the cluster (registry, queue, assignments), `launch` a job on it
//! (or, with no `--coordinator`, on a local mini-cluster started for the job: a coordinator,
//! N worker processes and a dataloader service on loopback), `status` and `cancel`.
//! Computes nothing and does not link burn.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use taming_coordinator::client;
use taming_coordinator::cluster::SUCCEEDED;
use taming_coordinator::http::serve_http;
use taming_coordinator::service::{CoordinatorService, ServeOptions, serve};
use taming_proto::auth::TOKEN_ENV;
use taming_proto::coordinator::JobSpec;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "taming-rs coordinator: serve the cluster, launch and follow jobs"
)]
struct Cli {
    /// Cluster token (also read from TAMING_CLUSTER_TOKEN).
    #[arg(long, global = true, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    telemetry: taming_telemetry::TelemetryArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Vqgan,
    Transformer,
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
    },
    /// Run a training job and follow it.
    Launch {
        /// What to train.
        #[arg(long, value_enum)]
        stage: Stage,
        /// Ranks (workers) to run on.
        #[arg(long, default_value_t = 1)]
        nodes: u32,
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
        #[arg(long, value_parser = ["none", "class", "segmentation"])]
        cond: Option<String>,
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
        device: String,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = cli.telemetry.clone();
    telemetry.main("taming-coordinator", "warn", || {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        rt.block_on(run(cli))
    })
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let token = cli.token;
    match cli.command {
        Cmd::Serve {
            bind,
            state,
            heartbeat_timeout,
            http,
        } => {
            let service = CoordinatorService::new(ServeOptions {
                state_dir: state,
                heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
                heartbeat_interval: Duration::from_secs(1),
                token,
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
            serve(service, listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { coordinator } => {
            let mut c = client::connect(&coordinator, token.as_deref()).await?;
            for job in client::list(&mut c).await? {
                println!(
                    "{}  step {:>7}  {}",
                    job.job_id,
                    job.step,
                    client::line(&job)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { job, coordinator } => {
            let mut c = client::connect(&coordinator, token.as_deref()).await?;
            println!("{job}: {}", client::cancel(&mut c, &job).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Launch {
            stage,
            nodes,
            min_nodes,
            config,
            data,
            out,
            steps,
            resume,
            checkpoint_url,
            device,
            coordinator,
            eval_every,
            checkpoint_every,
            quiet,
            dataloaders,
            vqgan,
            cond,
            codes,
            val_codes,
            cond_vqgan,
            dataloader_addrs,
        } => {
            let transformer = stage == Stage::Transformer;
            if transformer && vqgan.is_none() {
                bail!(
                    "--stage transformer needs --vqgan MODEL (a stage-1 model directory, e.g. runs/vqgan/model)"
                );
            }
            check_config(stage, config.as_deref())?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from(if transformer {
                    "runs/transformer"
                } else {
                    "runs/vqgan"
                })
            });
            let path_text = |p: Option<PathBuf>| -> Result<String> {
                Ok(match p {
                    Some(p) => std::path::absolute(&p)?.to_string_lossy().into_owned(),
                    None => String::new(),
                })
            };
            let config_yaml = match &config {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let spec = JobSpec {
                stage: if transformer { "transformer" } else { "vqgan" }.into(),
                config_yaml,
                data: data.map(absolute_if_local).unwrap_or_default(),
                out: std::path::absolute(&out)?.to_string_lossy().into_owned(),
                steps,
                nodes,
                min_nodes: min_nodes.unwrap_or(nodes),
                dataloaders: dataloader_addrs,
                collective: "ring".into(),
                eval_every,
                checkpoint_every,
                resume,
                device,
                vqgan: path_text(vqgan)?,
                cond: cond.unwrap_or_default(),
                codes: codes.map(absolute_if_local).unwrap_or_default(),
                val_codes: val_codes.map(absolute_if_local).unwrap_or_default(),
                cond_vqgan: path_text(cond_vqgan)?,
                checkpoint_url: checkpoint_url.map(absolute_if_local).unwrap_or_default(),
            };
            match coordinator {
                Some(addr) => launch_remote(&addr, token.as_deref(), spec, !quiet).await,
                None => launch_local(spec, dataloaders, !quiet).await,
            }
        }
    }
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
    spec: JobSpec,
    show: bool,
) -> Result<ExitCode> {
    let mut c = client::connect(addr, token).await?;
    let id = client::submit(&mut c, spec).await?;
    eprintln!("submitted {id}");
    finish(client::follow(&mut c, &id, show).await?)
}

fn finish(job: taming_proto::coordinator::Job) -> Result<ExitCode> {
    println!("{}: {}", job.job_id, client::line(&job));
    if job.state == SUCCEEDED {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{} {}: {}", job.job_id, job.state, job.message)
    }
}

/// Children killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A coordinator in this process, a dataloader service and `nodes` workers on loopback.
async fn launch_local(mut spec: JobSpec, dataloaders: usize, show: bool) -> Result<ExitCode> {
    let out = PathBuf::from(&spec.out);
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let token = random_token()?;
    let service = CoordinatorService::new(ServeOptions {
        state_dir: out.join(".coordinator"),
        heartbeat_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        token: Some(token.clone()),
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(service, listener, async {
        let _ = stop_rx.await;
    }));
    let mut children = Children(Vec::new());
    for i in 0..dataloaders {
        match start_dataloader(&logs, i) {
            Ok((child, dl)) => {
                children.0.push(child);
                spec.dataloaders.push(dl);
            }
            Err(e) => {
                eprintln!("note: no dataloader service ({e:#}); workers read the shards");
                break;
            }
        }
    }
    let worker = sibling("worker")?;
    for i in 0..spec.nodes {
        let log = std::fs::File::create(logs.join(format!("worker-{i}.log")))?;
        let child = Command::new(&worker)
            .args(["--coordinator", &addr, "--name", &format!("local-{i}")])
            .env(TOKEN_ENV, &token)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", worker.display()))?;
        children.0.push(child);
    }
    let mut c = client::connect(&addr, Some(&token)).await?;
    let id = client::submit(&mut c, spec).await?;
    let job = tokio::select! {
        job = client::follow(&mut c, &id, show) => job,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; {id} stopped with its workers (continue with --resume)")),
    };
    drop(children);
    let _ = stop_tx.send(());
    let _ = server.await;
    finish(job?)
}

/// 128 random bits, hex, for the mini-cluster's token.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Starts `dataloader serve` on a free loopback port; returns it and its address.
fn start_dataloader(logs: &Path, i: usize) -> Result<(Child, String)> {
    let bin = sibling("dataloader")?;
    let log = std::fs::File::create(logs.join(format!("dataloader-{i}.log")))?;
    let mut child = Command::new(&bin)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("the dataloader did not start")?;
    Ok((child, addr.to_string()))
}

/// Refuses a config the worker would refuse, before anything starts (needs the `worker`
/// binary beside this one; skipped when it is not there, e.g. on a submit-only machine).
fn check_config(stage: Stage, config: Option<&Path>) -> Result<()> {
    let Ok(worker) = sibling("worker") else {
        return Ok(());
    };
    let mut cmd = Command::new(worker);
    cmd.arg("check-config");
    if stage == Stage::Transformer {
        cmd.args(["--stage", "transformer"]);
    }
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

/// A binary beside this one (or named by `$TAMING_<NAME>_BIN`).
fn sibling(name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(format!("TAMING_{}_BIN", name.to_uppercase())) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating this executable")?;
    let bin = me.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} not found: build the workspace (same profile), or set TAMING_{}_BIN",
            bin.display(),
            name.to_uppercase()
        );
    }
    Ok(bin)
}
