//! The `vqgan` command line: import reference checkpoints, encode images to codes, decode
//! codes, reconstruct, evaluate, sample from a transformer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand};
use taming_import::taming;
use taming_model::checkpoint::native;
use taming_model::codes::CodeGrid;
use taming_model::device::DeviceSpec;
use taming_model::image_io;
use taming_model::loss::LpipsConfig;
use taming_model::quantize::QuantizeMode;
use taming_model::{Vqgan, VqganConfig};

use crate::input::{self, Fit};
use crate::{eval, fid, sample};

#[derive(Parser)]
#[command(
    name = "vqgan",
    version,
    about = "VQGAN tools: import, encode, decode, reconstruct, evaluate; sample from a transformer"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a reference (CompVis taming-transformers) YAML config and Lightning checkpoint.
    ImportTaming {
        /// The reference's YAML config (model.params.ddconfig, n_embed, embed_dim).
        #[arg(long)]
        config: PathBuf,
        /// The Lightning `.ckpt` file.
        #[arg(long)]
        ckpt: PathBuf,
        /// Model directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace `--out` if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Encode an image to a grid of code indices (JSON).
    Encode {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: ImageArgs,
        /// Output codes.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode and decode an image.
    Reconstruct {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: ImageArgs,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
    },
    /// Reconstruction quality over a data set: L1, PSNR, SSIM, LPIPS (with weights), rFID
    /// (with `--inception`) and codebook usage; printed and written as JSON.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Directory of WebDataset shards.
        #[arg(long)]
        data: PathBuf,
        /// Which shards: `{split}-*.tar`.
        #[arg(long, default_value = "val")]
        split: String,
        /// Images per batch.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// torchvision's VGG16 weights, for LPIPS.
        #[arg(long, requires = "lpips_heads")]
        lpips_vgg16: Option<PathBuf>,
        /// The lpips package's weights/v0.1/vgg.pth, for LPIPS.
        #[arg(long, requires = "lpips_vgg16")]
        lpips_heads: Option<PathBuf>,
        /// VGG stages LPIPS uses (5 for LPIPS proper).
        #[arg(long, default_value_t = 5)]
        lpips_stages: usize,
        /// rFID: FID of the reconstructions against the images, with these Inception weights.
        #[command(flatten)]
        inception: fid::InceptionArgs,
        /// Where to write the JSON report (default: eval-SPLIT.json in the model directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// FID between two image sets (folders, shards or statistics .npz) with pytorch-fid's
    /// Inception, printed as JSON; or one set's statistics written with `--save-stats`.
    Fid(fid::FidArgs),
    /// Sample images from a trained transformer (class, segmentation map or unconditional;
    /// the sliding window for sizes above the training window).
    Sample(sample::SampleArgs),
    /// Import a reference Net2NetTransformer (YAML config and Lightning checkpoint).
    ImportTransformer(sample::ImportArgs),
    /// Decode a grid of code indices (JSON) to an image.
    Decode {
        #[command(flatten)]
        model: ModelArgs,
        /// Input codes.json.
        #[arg(long)]
        codes: PathBuf,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (written by `vqgan import-taming` or training).
    #[arg(long)]
    model: PathBuf,
    /// Device: cpu, cuda:N or vulkan:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Args)]
struct ImageArgs {
    /// Input image (PNG, JPEG, WebP).
    #[arg(long)]
    image: PathBuf,
    /// Take the image at its own size (a multiple of the downsampling factor) instead of
    /// resizing its shorter side and center-cropping to the model's resolution.
    #[arg(long)]
    no_resize: bool,
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ImportTaming {
            config,
            ckpt,
            out,
            force,
        } => import(&config, &ckpt, &out, force),
        Command::Encode { model, input, out } => {
            let (config, vqgan, device) = load(&model)?;
            let x = read_input(&input, &config, &device)?;
            let q = vqgan.encode(x, QuantizeMode::EVAL);
            CodeGrid::from_tensor(q.indices).write(&out)?;
            Ok(())
        }
        Command::Reconstruct { model, input, out } => {
            let (config, vqgan, device) = load(&model)?;
            let x = read_input(&input, &config, &device)?;
            let rec = vqgan.forward(x, QuantizeMode::EVAL).reconstruction;
            image_io::write_png(&image_io::to_image(rec), &out)?;
            Ok(())
        }
        Command::Eval {
            model,
            data,
            split,
            batch_size,
            lpips_vgg16,
            lpips_heads,
            lpips_stages,
            inception,
            out,
        } => {
            let lpips = lpips_vgg16
                .zip(lpips_heads)
                .map(|(vgg16, heads)| LpipsConfig {
                    vgg16,
                    heads,
                    stages: lpips_stages,
                });
            let out = out.unwrap_or_else(|| model.model.join(format!("eval-{split}.json")));
            eval::run(eval::EvalJob {
                model_dir: &model.model,
                device: model.device,
                data: &data,
                split: &split,
                batch_size,
                lpips,
                inception: &inception,
                out: &out,
            })
        }
        Command::Fid(args) => fid::run(args),
        Command::Sample(args) => sample::sample(args),
        Command::ImportTransformer(args) => sample::import(args),
        Command::Decode { model, codes, out } => {
            let (config, vqgan, device) = load(&model)?;
            let grid = CodeGrid::read(&codes)?;
            let indices = grid.to_tensor(config.n_embed, &codes, &device)?;
            image_io::write_png(&image_io::to_image(vqgan.decode_indices(indices)), &out)?;
            Ok(())
        }
    }
}

fn import(config: &Path, ckpt: &Path, out: &Path, force: bool) -> Result<()> {
    let device = Device::flex();
    let imported = taming::import_taming(config, ckpt, &device)
        .with_context(|| format!("importing {}", ckpt.display()))?;
    for name in &imported.ignored {
        eprintln!("warning: checkpoint tensor `{name}` has no place in the model; skipped");
    }
    native::save_model(
        out,
        &imported.config,
        &imported.model,
        &imported.loss_tensors,
        force,
    )?;
    let loss: BTreeMap<_, _> = imported.loss_tensors;
    println!(
        "imported {} (step {}): {} codes of dim {}, factor {}; {} loss-module tensors kept -> {}",
        ckpt.display(),
        imported.global_step.map_or("?".into(), |s| s.to_string()),
        imported.config.n_embed,
        imported.config.embed_dim,
        imported.config.ddconfig.downsample_factor(),
        loss.len(),
        out.display()
    );
    Ok(())
}

fn load(args: &ModelArgs) -> Result<(VqganConfig, Vqgan, Device)> {
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let (config, model) = native::load_model(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    Ok((config, model, device))
}

fn read_input(input: &ImageArgs, config: &VqganConfig, device: &Device) -> Result<burn::Tensor<4>> {
    let dd = &config.ddconfig;
    let fit = if input.no_resize {
        Fit::AsIs {
            factor: dd.downsample_factor(),
        }
    } else {
        Fit::ResizeCrop {
            size: dd.resolution,
        }
    };
    let img = input::fit_image(input::read_rgb(&input.image)?, fit, &input.image)?;
    Ok(image_io::to_tensor(&img, device))
}
