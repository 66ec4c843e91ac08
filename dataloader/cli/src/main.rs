//! `dataloader`: serve ready batches over gRPC, pack image folders into WebDataset shards,
//! and precompute the code-index Parquet of stage 2.

mod precompute;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use taming_dataloader::pack::{Layout, PackOptions, pack};
use taming_model::device::DeviceSpec;

#[derive(Parser)]
#[command(
    name = "dataloader",
    version,
    about = "taming-rs data: serve, pack, precompute-codes"
)]
struct Cli {
    #[command(flatten)]
    telemetry: taming_telemetry::TelemetryArgs,
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
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50061")]
        bind: SocketAddr,
        /// Also serve Prometheus metrics at http://ADDR/metrics (samples/s, decode errors,
        /// queue depth, clients).
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
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
    PrecomputeCodes(precompute::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = cli.telemetry.clone();
    telemetry.main("taming-dataloader", "info", || {
        run(cli).map(|()| ExitCode::SUCCESS)
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { bind, metrics } => serve(bind, metrics),
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
        Command::PrecomputeCodes(args) => precompute::run(args),
    }
}

fn serve(bind: SocketAddr, metrics: Option<SocketAddr>) -> Result<()> {
    use taming_dataloader::service::{DataloaderService, serve_metrics, serve_service};
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind}"))?;
        let addr = listener.local_addr()?;
        // The line tests and launchers wait for.
        println!("listening on {addr}");
        let service = DataloaderService::default();
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
        serve_service(service, listener, shutdown)
            .await
            .context("serving")
    })
}

/// Parses `--device` (kept here so every subcommand shares it).
pub(crate) fn device(spec: DeviceSpec) -> Result<burn::tensor::Device> {
    spec.device().map_err(anyhow::Error::msg)
}
