//! The `dataloader` command line: serve ready batches over gRPC, pack image folders into
//! WebDataset shards, and precompute the code-index Parquet of stage 2.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use taming_dataloader::pack::{Layout, PackOptions, pack};
use taming_dataloader::service::{DEFAULT_MAX_STREAMS, TOKEN_ENV};
use taming_dataloader::shards::DataRoots;

#[derive(Parser)]
#[command(
    name = "dataloader",
    version,
    about = "taming-rs data: serve, pack, precompute-codes"
)]
pub struct Cli {
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: taming_telemetry::TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// One folder per class (ImageNet).
    Imagefolder,
    /// Images and label maps with the same stem in two folders (COCO-Stuff, ADE20K).
    Pairs,
    /// Every image below the folder.
    Plain,
}

#[derive(Subcommand)]
enum Command {
    /// Serve batches (StreamBatches) until interrupted.
    Serve(ServeArgs),
    /// Pack an image folder into WebDataset shards at any object-store URL.
    Pack {
        /// Input folder (the images, for `pairs`).
        #[arg(long)]
        input: PathBuf,
        /// Input layout.
        #[arg(long, value_enum, default_value = "plain")]
        layout: LayoutArg,
        /// Label-map folder (`pairs` only).
        #[arg(long)]
        masks: Option<PathBuf>,
        /// Added to every label id, wrapping at 256 (`pairs` only). COCO-Stuff: 1, so that
        /// unlabeled (255) becomes 0 and its 182 classes 1..=182, as the reference shifts them.
        #[arg(long)]
        label_offset: Option<u8>,
        /// Output directory: path or URL (s3://bucket/prefix, ...).
        #[arg(long)]
        out: String,
        /// Shard name prefix.
        #[arg(long, default_value = "train")]
        prefix: String,
        /// Target shard size in MB.
        #[arg(long, default_value_t = 256.0)]
        shard_mb: f64,
    },
    /// Encode every sample with a trained VQGAN and write code Parquet + `_manifest.json`.
    PrecomputeCodes(crate::precompute::Args),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    bind: SocketAddr,
    /// Also serve Prometheus metrics at http://ADDR/metrics (samples/s, decode errors,
    /// queue depth, clients).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Cluster token every call must carry (the gRPC health service answers without it).
    /// Required on an address other than loopback, unless --insecure.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: taming_proto::tls::TlsArgs,
    /// Streams served at once; more are refused (RESOURCE_EXHAUSTED) until one ends.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_streams: u32,
    /// A local directory whose shards requests may name (repeatable). Without one, requests
    /// may name object-store URLs only (s3://, gs://, az://), no local path.
    #[arg(long = "data-root", value_name = "DIR")]
    data_roots: Vec<PathBuf>,
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Pack {
            input,
            layout,
            masks,
            label_offset,
            out,
            prefix,
            shard_mb,
        } => {
            let layout = match (layout, masks) {
                (LayoutArg::Pairs, Some(masks)) => Layout::Pairs {
                    masks,
                    label_offset: label_offset.unwrap_or(0),
                },
                (LayoutArg::Pairs, None) => anyhow::bail!("--layout pairs needs --masks DIR"),
                (_, Some(_)) => anyhow::bail!("--masks is only for --layout pairs"),
                (_, None) if label_offset.is_some() => {
                    anyhow::bail!("--label-offset is only for --layout pairs")
                }
                (LayoutArg::Imagefolder, None) => Layout::ImageFolder,
                (LayoutArg::Plain, None) => Layout::Plain,
            };
            anyhow::ensure!(shard_mb > 0.0, "--shard-mb must be positive");
            let opts = PackOptions {
                input,
                layout,
                out,
                prefix,
                shard_bytes: (shard_mb * 1e6) as usize,
            };
            let report = pack(&opts).context("packing")?;
            println!(
                "{} samples in {} shard(s), {} skipped",
                report.samples,
                report.shards.len(),
                report.skipped
            );
            Ok(())
        }
        Command::PrecomputeCodes(args) => crate::precompute::run(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    use taming_dataloader::service::{
        DataloaderService, ServiceOptions, serve_metrics, serve_service,
    };
    let ServeArgs {
        bind,
        metrics,
        token,
        tls,
        max_streams,
        data_roots,
    } = args;
    let transport = tls.load()?;
    let insecure = transport.insecure;
    let token = token.filter(|t| !t.is_empty());
    if token.is_none() && !bind.ip().is_loopback() {
        anyhow::ensure!(
            insecure,
            "refusing to serve on {bind} without a cluster token: anyone who reaches it could \
             read the shards this service can. Give --token or {TOKEN_ENV} (the workers send \
             theirs), bind a loopback address, or pass --insecure"
        );
        tracing::warn!(%bind, "serving without a cluster token on an address other than loopback (--insecure): anyone who reaches it can stream the shards this service can read");
    } else if token.is_none() {
        tracing::warn!(%bind, "serving without a cluster token: any local process can stream batches (give --token or {TOKEN_ENV})");
    }
    let server_tls = transport.server(bind, "the dataloader")?;
    let data_roots = DataRoots::new(data_roots).context("--data-root")?;
    let service = DataloaderService::new(ServiceOptions {
        token,
        max_streams: max_streams as usize,
        data_roots,
    });
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind}"))?;
        let addr = listener.local_addr()?;
        // The line tests and launchers wait for.
        println!("listening on {addr}");
        if let Some(m) = metrics {
            let http = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding --metrics {m}"))?;
            println!("metrics on http://{}/metrics", http.local_addr()?);
            tokio::spawn(serve_metrics(service.stats(), http, async {
                let _ = tokio::signal::ctrl_c().await;
            }));
        }
        tracing::info!(%addr, "dataloader service ready");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve_service(service, listener, server_tls, shutdown)
            .await
            .context("serving")
    })
}
