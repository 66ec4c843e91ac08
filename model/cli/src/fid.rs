//! `vqgan fid`: the Fréchet Inception Distance between two image sets, as pytorch-fid 0.3.0
//! computes it (its Inception-v3, 2048-d pool features, `np.cov` statistics), in f64.
//!
//! Each input is a folder of images (its top-level files with pytorch-fid's extensions, in
//! sorted order), WebDataset shards (a directory holding `*.tar` files, a `.tar` file or a
//! brace pattern) or a statistics `.npz` (`mu`, `sigma`, as pytorch-fid's `--save-stats`
//! writes). `--save-stats OUT.npz` writes one input's statistics instead.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use image::RgbImage;
use serde::Serialize;
use taming_dataloader::bounds::MAX_IMAGE_PIXELS;
use taming_dataloader::reader::{ReaderConfig, SampleReader};
use taming_dataloader::source::locate;
use taming_dataloader::{LoaderState, sample, shards};
use taming_import::inception::{FID_WEIGHTS_FILE, WeightsCheck, load_fid_inception};
use taming_import::npz;
use taming_model::device::DeviceSpec;
use taming_model::fid::{FeatureStats, StatsAccumulator, frechet_distance};
use taming_model::inception::{FEATURES, FidInception, prepare};

/// pytorch-fid's image extensions (lower case, as its `glob` matches them).
const IMAGE_EXTENSIONS: [&str; 9] = [
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// Where the Inception weights come from, as the command line gives them.
#[derive(Args, Debug, Clone)]
pub struct InceptionArgs {
    /// pytorch-fid's Inception weights, `pt_inception-2015-12-05-6726825d.pth` (its SHA-256 is
    /// checked).
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Accept an `--inception` file other than pytorch-fid's, in the same layout (a
    /// fine-tuned Inception, test weights). Its scores are not comparable to published FIDs.
    #[arg(long, requires = "inception")]
    pub any_weights: bool,
}

impl InceptionArgs {
    /// The weights check the flags ask for.
    pub fn check(&self) -> WeightsCheck {
        WeightsCheck::accepting_any(self.any_weights)
    }
}

/// `vqgan fid` arguments.
#[derive(Args, Debug)]
pub struct FidArgs {
    #[command(flatten)]
    inception: InceptionArgs,
    /// Write the statistics (`mu`, `sigma`) of the single input to this `.npz` instead of
    /// computing a distance.
    #[arg(long)]
    save_stats: Option<PathBuf>,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Device: cpu, cuda:N or vulkan:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Also write the JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Two inputs (one with `--save-stats`): image folders, shards (a directory of `*.tar`, a
    /// `.tar`, a brace pattern) or statistics `.npz` files.
    #[arg(required = true, num_args = 1..=2)]
    inputs: Vec<String>,
}

/// One input set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Precomputed statistics.
    Stats(PathBuf),
    /// WebDataset shards.
    Shards(Vec<String>),
    /// A folder of image files.
    Folder(PathBuf),
}

impl Input {
    /// What `spec` names: a `.npz` file, shards or an image folder.
    pub fn classify(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if spec.ends_with(".npz") {
            ensure!(path.is_file(), "{spec}: no such statistics file");
            return Ok(Self::Stats(path.to_path_buf()));
        }
        let has_tars = |dir: &Path| -> Result<bool> {
            for entry in std::fs::read_dir(dir).with_context(|| format!("reading {spec}"))? {
                let p = entry?.path();
                if p.is_file() && p.extension().is_some_and(|e| e == "tar") {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        if spec.contains('{') || spec.contains("://") || spec.ends_with(".tar") {
            return Ok(Self::Shards(shards::resolve(spec)?));
        }
        ensure!(
            path.is_dir(),
            "{spec}: neither a folder, shards nor a .npz file"
        );
        if has_tars(path)? {
            Ok(Self::Shards(shards::resolve(spec)?))
        } else {
            Ok(Self::Folder(path.to_path_buf()))
        }
    }
}

/// pytorch-fid's Inception on a device, turning image batches into feature statistics.
pub struct Extractor {
    net: FidInception,
    device: Device,
    batch_size: usize,
}

impl Extractor {
    /// Loads the weights `args` name (an error when they name none).
    pub fn load(args: &InceptionArgs, device: &Device, batch_size: usize) -> Result<Self> {
        let Some(path) = &args.inception else {
            bail!("--inception FILE ({FID_WEIGHTS_FILE}) is needed to compute features of images");
        };
        let net = load_fid_inception(path, args.check(), device).with_context(|| {
            format!(
                "loading the FID Inception weights{}",
                if args.any_weights {
                    ""
                } else {
                    " (--any-weights accepts other weights of the same layout)"
                }
            )
        })?;
        Ok(Self {
            net,
            device: device.clone(),
            batch_size: batch_size.max(1),
        })
    }

    /// Images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Adds the features of `images` (`[b, 3, h, w]`, values in [0, 1]) to `acc`.
    pub fn add_batch(&self, acc: &mut StatsAccumulator, images: Tensor<4>) -> Result<()> {
        let features = self.net.features(images);
        acc.add(&features.try_into_vec_as::<f32>().context("features")?);
        Ok(())
    }

    /// Adds the features of decoded images of any sizes (each resized to 299x299).
    pub fn add_images(&self, acc: &mut StatsAccumulator, images: &[RgbImage]) -> Result<()> {
        if images.is_empty() {
            return Ok(());
        }
        let prepared = images
            .iter()
            .map(|img| prepare(unit_tensor(img, &self.device)))
            .collect();
        let features = self.net.features_299(Tensor::cat(prepared, 0));
        acc.add(&features.try_into_vec_as::<f32>().context("features")?);
        Ok(())
    }

    /// Statistics of an image folder or shards.
    pub fn stats_of(&self, input: &Input) -> Result<FeatureStats> {
        let mut acc = StatsAccumulator::new(FEATURES);
        let mut batch = Vec::with_capacity(self.batch_size);
        let flush = |batch: &mut Vec<RgbImage>, acc: &mut StatsAccumulator| {
            let result = self.add_images(acc, batch);
            batch.clear();
            result
        };
        match input {
            Input::Stats(path) => return Ok(npz::read_stats(path)?),
            Input::Folder(dir) => {
                for path in image_files(dir)? {
                    batch.push(read_image(&path)?);
                    if batch.len() == self.batch_size {
                        flush(&mut batch, &mut acc)?;
                    }
                }
            }
            Input::Shards(urls) => {
                let locations = urls.iter().map(|u| locate(u)).collect::<Result<_, _>>()?;
                let cfg = ReaderConfig {
                    shuffle_shards: false,
                    shuffle_buffer: 0,
                    ..ReaderConfig::default()
                };
                let mut reader = SampleReader::new(locations, cfg, &LoaderState::default())?;
                while let Some(raw) = reader.next_raw()? {
                    let shard = reader.shard_url(raw.shard).to_string();
                    let key = sample::safe_key(&raw.sample)
                        .map_err(anyhow::Error::msg)?
                        .to_string();
                    let bytes = sample::image_bytes(&raw.sample).with_context(|| {
                        format!("{shard}: sample `{key}` has no image (png, jpg, jpeg, webp)")
                    })?;
                    let img = decode(bytes).with_context(|| format!("{shard}: sample `{key}`"))?;
                    batch.push(img);
                    if batch.len() == self.batch_size {
                        flush(&mut batch, &mut acc)?;
                    }
                }
                ensure!(
                    reader.bad_shards() == 0,
                    "{} shard(s) could not be read to the end",
                    reader.bad_shards()
                );
            }
        }
        flush(&mut batch, &mut acc)?;
        Ok(acc.finish()?)
    }
}

/// An RGB image as a `[1, 3, h, w]` tensor in [0, 1] (`ToTensor`: x / 255).
pub fn unit_tensor(img: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * h * w + y as usize * w + x as usize] = px.0[c] as f32 / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), device)
}

/// The top-level files of `dir` with pytorch-fid's image extensions, sorted.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() && IMAGE_EXTENSIONS.contains(&ext) {
            files.push(path);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "{}: no image files", dir.display());
    Ok(files)
}

fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes).with_context(|| format!("{}", path.display()))
}

/// Decodes an image as RGB (as PIL's `convert('RGB')`), refusing one whose header declares
/// more than [`MAX_IMAGE_PIXELS`] before decoding it.
fn decode(bytes: &[u8]) -> Result<RgbImage> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .expect("reading from memory")
    };
    let (w, h) = reader().into_dimensions().context("not a readable image")?;
    let pixels = w as u64 * h as u64;
    ensure!(
        pixels > 0 && pixels <= MAX_IMAGE_PIXELS,
        "{w}x{h} image; 1 to {MAX_IMAGE_PIXELS} pixels accepted"
    );
    Ok(reader()
        .decode()
        .context("not a readable image")?
        .into_rgb8())
}

/// The printed result.
#[derive(Debug, Serialize)]
struct FidReport {
    fid: f64,
    /// Images per input (`null` for a statistics file).
    n: [Option<usize>; 2],
}

/// Runs `vqgan fid`.
pub fn run(args: FidArgs) -> Result<()> {
    let inputs = args
        .inputs
        .iter()
        .map(|s| Input::classify(s))
        .collect::<Result<Vec<_>>>()?;
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let needs_net = inputs.iter().any(|i| !matches!(i, Input::Stats(_)));
    let extractor = needs_net
        .then(|| Extractor::load(&args.inception, &device, args.batch_size))
        .transpose()?;
    let stats_of = |input: &Input, spec: &str| -> Result<FeatureStats> {
        match (input, &extractor) {
            (Input::Stats(path), _) => Ok(npz::read_stats(path)?),
            (_, Some(ex)) => ex
                .stats_of(input)
                .with_context(|| format!("features of {spec}")),
            (_, None) => unreachable!("the network is loaded for image inputs"),
        }
    };
    if let Some(out) = &args.save_stats {
        ensure!(
            inputs.len() == 1,
            "--save-stats takes one input, {} given",
            inputs.len()
        );
        ensure!(
            !out.exists(),
            "{}: exists; statistics are not overwritten",
            out.display()
        );
        let stats = stats_of(&inputs[0], &args.inputs[0])?;
        npz::write_stats(out, &stats)?;
        let report = serde_json::json!({ "saved": out, "n": stats.n });
        println!("{report}");
        if let Some(path) = &args.out {
            taming_model::atomic::write(path, report.to_string().as_bytes())?;
        }
        return Ok(());
    }
    ensure!(
        inputs.len() == 2,
        "two inputs are needed (or one with --save-stats), {} given",
        inputs.len()
    );
    let a = stats_of(&inputs[0], &args.inputs[0])?;
    let b = stats_of(&inputs[1], &args.inputs[1])?;
    let report = FidReport {
        fid: frechet_distance(&a, &b)?,
        n: [a.n, b.n],
    };
    let json = serde_json::to_string(&report).expect("report serializes");
    println!("{json}");
    if let Some(path) = &args.out {
        taming_model::atomic::write(path, json.as_bytes())?;
    }
    Ok(())
}
