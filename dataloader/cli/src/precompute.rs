//! `dataloader precompute-codes`: every sample of a shard set through a trained VQGAN (and a
//! cond-stage VQGAN for segmentation maps), written as code Parquet. Ranks split the shards;
//! each writes its own files and a part list, and whichever rank finds every part present
//! writes `_manifest.json`, last.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use taming_dataloader::codes::{self, CodeRow, ManifestFile};
use taming_dataloader::shards::resolve;
use taming_dataloader::{
    BatchSource, ImageBatch, LoaderConfig, Prefetched, Preprocess, ReaderConfig, ShardLoader,
};
use taming_model::Vqgan;
use taming_model::checkpoint::native;
use taming_model::device::DeviceSpec;
use taming_model::image_io;
use taming_model::quantize::QuantizeMode;

/// Arguments of `precompute-codes`.
#[derive(clap::Args)]
pub struct Args {
    /// Trained VQGAN (native model directory).
    #[arg(long)]
    vqgan: PathBuf,
    /// Shards: paths, URLs or brace patterns (repeatable).
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Output directory URL or path.
    #[arg(long)]
    out: String,
    /// Cond-stage VQGAN for segmentation maps (`.seg.png` of each sample, one-hot encoded;
    /// samples without one are skipped with a warning).
    #[arg(long)]
    cond_vqgan: Option<PathBuf>,
    /// Image side fed to the VQGAN (default: the model's resolution).
    #[arg(long)]
    size: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Rows per Parquet file.
    #[arg(long, default_value_t = 50_000)]
    rows_per_file: usize,
    /// This process's rank.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Number of ranks splitting the shards.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// cpu, cuda:N or vulkan:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// One rank's files.
#[derive(Debug, Serialize, Deserialize)]
struct Part {
    files: Vec<ManifestFile>,
}

struct Models {
    vqgan: Vqgan,
    cond: Option<(Vqgan, usize)>,
    device: Device,
}

/// Runs the precompute.
pub fn run(args: Args) -> Result<()> {
    if args.batch == 0 || args.rows_per_file == 0 {
        bail!("--batch and --rows-per-file must be at least 1");
    }
    if args.rank >= args.world_size {
        bail!(
            "--rank {} must be below --world-size {}",
            args.rank,
            args.world_size
        );
    }
    let models = load_models(&args)?;
    let size = args
        .size
        .unwrap_or(native::read_config(&args.vqgan)?.ddconfig.resolution);
    let mut shards = Vec::new();
    for spec in &args.data {
        shards.extend(resolve(spec)?);
    }
    let cfg = LoaderConfig {
        batch_size: args.batch,
        preprocess: Preprocess {
            size,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig {
            rank: args.rank,
            world_size: args.world_size,
            shuffle_shards: false,
            ..ReaderConfig::default()
        },
        require_masks: args.cond_vqgan.is_some(),
    };
    let loader = ShardLoader::open(&shards, cfg, &Default::default())?;
    // Decoding the next batches overlaps encoding this one.
    let mut batches = Prefetched::epoch(loader, 2);
    let mut writer = FileWriter::new(&args);
    while let Some(batch) = batches.next_in_epoch()? {
        writer.push(encode_batch(&models, &batch)?)?;
    }
    let skipped = batches.skipped();
    let files = writer.finish()?;
    let total: u64 = files.iter().map(|f| f.rows).sum();
    write_part(&args, files)?;
    println!(
        "rank {}: {total} rows, {skipped} samples skipped",
        args.rank
    );
    maybe_write_manifest(&args)
}

fn load_models(args: &Args) -> Result<Models> {
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let (_, vqgan) = native::load_model(&args.vqgan, &device)
        .with_context(|| format!("loading {}", args.vqgan.display()))?;
    let cond = match &args.cond_vqgan {
        Some(dir) => {
            let (config, model) = native::load_model(dir, &device)
                .with_context(|| format!("loading {}", dir.display()))?;
            Some((model, config.ddconfig.in_channels))
        }
        None => None,
    };
    Ok(Models {
        vqgan,
        cond,
        device,
    })
}

fn encode_batch(models: &Models, batch: &ImageBatch) -> Result<Vec<CodeRow>> {
    let x = Tensor::<4>::from_data(
        TensorData::new(batch.images.clone(), batch.shape),
        &models.device,
    );
    let codes = indices(&models.vqgan, x);
    let cond = match &models.cond {
        Some((model, classes)) => Some(indices(model, one_hot(batch, *classes, &models.device)?)),
        None => None,
    };
    let (h, w) = (codes.1, codes.2);
    let per = h * w;
    Ok((0..batch.keys.len())
        .map(|i| CodeRow {
            key: batch.keys[i].clone(),
            codes: codes.0[i * per..(i + 1) * per].to_vec(),
            height: h as i32,
            width: w as i32,
            label: batch.labels[i],
            cond_codes: cond.as_ref().map(|c| {
                let per = c.1 * c.2;
                c.0[i * per..(i + 1) * per].to_vec()
            }),
            shard: batch.sources[i].clone(),
        })
        .collect())
}

/// Code indices of a batch, flattened, with the token grid's height and width.
fn indices(model: &Vqgan, x: Tensor<4>) -> (Vec<i32>, usize, usize) {
    let q: Tensor<3, Int> = model.encode(x, QuantizeMode::EVAL).indices;
    let [_, h, w] = q.dims();
    let flat = q.try_into_vec_as::<i64>().expect("int indices");
    (flat.into_iter().map(|v| v as i32).collect(), h, w)
}

/// One-hot `[b, classes, s, s]` of the batch's label maps.
fn one_hot(batch: &ImageBatch, classes: usize, device: &Device) -> Result<Tensor<4>> {
    let [b, _, h, w] = batch.shape;
    let masks = batch
        .masks
        .as_ref()
        .context("--cond-vqgan needs a label map (.seg.png) in every sample")?;
    let maps = (0..b)
        .map(|n| {
            let source = format!("{} sample `{}`", batch.sources[n], batch.keys[n]);
            let labels = &masks[n * h * w..(n + 1) * h * w];
            image_io::one_hot(labels, classes, [h, w], &source, device)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(maps, 0))
}

/// Collects rows and writes a Parquet file every `rows_per_file`.
struct FileWriter<'a> {
    args: &'a Args,
    rows: Vec<CodeRow>,
    files: Vec<ManifestFile>,
}

impl<'a> FileWriter<'a> {
    fn new(args: &'a Args) -> Self {
        Self {
            args,
            rows: Vec::new(),
            files: Vec::new(),
        }
    }

    fn push(&mut self, rows: Vec<CodeRow>) -> Result<()> {
        self.rows.extend(rows);
        while self.rows.len() >= self.args.rows_per_file {
            let rest = self.rows.split_off(self.args.rows_per_file);
            self.flush()?;
            self.rows = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let name = format!(
            "codes-r{:04}-{:05}.parquet",
            self.args.rank,
            self.files.len()
        );
        let url = codes::join(&self.args.out, &name);
        codes::write_codes(&url, &self.rows)?;
        tracing::info!(file = %url, rows = self.rows.len(), "written");
        self.files.push(ManifestFile {
            path: name,
            rows: self.rows.len() as u64,
        });
        self.rows.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ManifestFile>> {
        if !self.rows.is_empty() {
            self.flush()?;
        }
        Ok(self.files)
    }
}

fn part_url(args: &Args, rank: usize) -> String {
    codes::join(
        &args.out,
        &format!("_parts/rank-{rank:04}-of-{:04}.json", args.world_size),
    )
}

fn write_part(args: &Args, files: Vec<ManifestFile>) -> Result<()> {
    let json = serde_json::to_vec(&Part { files }).expect("part serializes");
    codes::upload(&part_url(args, args.rank), json.into())?;
    Ok(())
}

/// Writes `_manifest.json` when every rank's part is present.
fn maybe_write_manifest(args: &Args) -> Result<()> {
    let mut files = Vec::new();
    for rank in 0..args.world_size {
        let Ok(data) = codes::download(&part_url(args, rank)) else {
            tracing::info!("rank {rank} not finished; it will write the manifest");
            return Ok(());
        };
        let part: Part = serde_json::from_slice(&data)
            .with_context(|| format!("reading {}", part_url(args, rank)))?;
        files.extend(part.files);
    }
    let manifest = codes::write_manifest(&args.out, files)?;
    println!(
        "manifest: {} files, {} rows",
        manifest.files.len(),
        manifest.rows
    );
    Ok(())
}
