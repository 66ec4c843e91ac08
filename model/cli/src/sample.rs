//! `vqgan sample`: images from a trained transformer and its VQGAN, conditioned on a class, a
//! segmentation map (through the cond-stage VQGAN) or nothing; grids larger than the
//! training window are filled with the sliding window. `vqgan import-transformer`: a
//! reference Net2NetTransformer checkpoint into the project's model directories.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use taming_import::net2net;
use taming_model::checkpoint::native;
use taming_model::device::DeviceSpec;
use taming_model::image_io::{tile, write_png};
use taming_model::synthesis::{SynthCond, Synthesizer};
use taming_model::transformer::{Sampling, TokenLayout};

/// Arguments of `vqgan sample`.
#[derive(clap::Args)]
pub struct SampleArgs {
    /// Transformer model directory (from stage-2 training or import-transformer).
    #[arg(long)]
    transformer: PathBuf,
    /// First-stage VQGAN model directory.
    #[arg(long)]
    vqgan: PathBuf,
    /// Cond-stage VQGAN (segmentation-conditioned transformers).
    #[arg(long)]
    cond_vqgan: Option<PathBuf>,
    /// Class label (class-conditional transformers).
    #[arg(long, conflicts_with = "segmentation")]
    class: Option<i64>,
    /// Segmentation map: a PNG of class ids (gray levels, or palette indices).
    #[arg(long)]
    segmentation: Option<PathBuf>,
    /// Added to every id of the segmentation map, wrapping at 256, as `dataloader pack
    /// --label-offset` did to the training maps (COCO-Stuff: 1).
    #[arg(long, default_value_t = 0, requires = "segmentation")]
    label_offset: u8,
    /// Images to sample.
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image size WIDTHxHEIGHT in pixels (default: the training window; with
    /// --segmentation: the map's size). Larger sizes use the sliding window.
    #[arg(long)]
    size: Option<String>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Keep the k most likely codes.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the most likely codes up to this probability mass.
    #[arg(long)]
    top_p: Option<f64>,
    /// Images per row of the grid.
    #[arg(long, default_value_t = 4)]
    per_row: usize,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// Device: cpu, cuda:N or vulkan:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// `WIDTHxHEIGHT` as `[height, width]`.
fn parse_size(text: &str) -> Result<[usize; 2]> {
    let (w, h) = text
        .split_once('x')
        .with_context(|| format!("`{text}`: expected WIDTHxHEIGHT"))?;
    let num = |v: &str| {
        v.parse::<usize>()
            .with_context(|| format!("`{text}`: `{v}` is not a number"))
    };
    Ok([num(h)?, num(w)?])
}

fn read_map(path: &Path, offset: u8) -> Result<SynthCond> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading segmentation map {}", path.display()))?;
    let img = taming_dataloader::label_map::decode_with_offset(&bytes, offset)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading segmentation map {}", path.display()))?;
    let size = [img.height() as usize, img.width() as usize];
    Ok(SynthCond::Map {
        labels: img.into_raw(),
        size,
        source: path.display().to_string(),
    })
}

/// Runs `vqgan sample`.
pub fn sample(args: SampleArgs) -> Result<()> {
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let (t_config, gpt) = native::load_transformer(&args.transformer, &device)
        .with_context(|| format!("loading transformer {}", args.transformer.display()))?;
    let (v_config, vqgan) = native::load_model(&args.vqgan, &device)
        .with_context(|| format!("loading VQGAN {}", args.vqgan.display()))?;
    let cond_vq = match &args.cond_vqgan {
        Some(dir) => Some(
            native::load_model(dir, &device)
                .with_context(|| format!("loading cond VQGAN {}", dir.display()))?,
        ),
        None => None,
    };
    let layout = TokenLayout::new(t_config)?;
    let synth = Synthesizer {
        gpt: &gpt,
        layout: &layout,
        vqgan: (&v_config, &vqgan),
        cond_vqgan: cond_vq.as_ref().map(|(c, m)| (c, m)),
        device: device.clone(),
    };
    synth.check()?;
    let f = synth.factor();
    let cond = match (&args.segmentation, args.class) {
        (Some(map), _) => read_map(map, args.label_offset)?,
        (None, Some(c)) => SynthCond::Class(c),
        (None, None) => SynthCond::None,
    };
    let window = layout.config().window;
    let pixels = match (&args.size, &cond) {
        (Some(s), _) => parse_size(s)?,
        (None, SynthCond::Map { size, .. }) => *size,
        (None, _) => [window[0] * f, window[1] * f],
    };
    if pixels[0] % f != 0 || pixels[1] % f != 0 {
        bail!(
            "size {}x{} is not a multiple of the VQGAN's factor {f}",
            pixels[1],
            pixels[0]
        );
    }
    if let SynthCond::Map { size, source, .. } = &cond
        && *size != pixels
    {
        bail!(
            "{source}: the map is {}x{}, the requested size {}x{}",
            size[1],
            size[0],
            pixels[1],
            pixels[0]
        );
    }
    let grid = [pixels[0] / f, pixels[1] / f];
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    let grid_cond = synth.grid_cond(&cond, grid)?;
    let codes = synth.sample_codes(&grid_cond, grid, args.n, sampling, args.seed)?;
    let images = synth.decode(&codes, grid);
    write_png(&tile(&images, args.per_row), &args.out)?;
    println!(
        "{} samples of {}x{} pixels ({}x{} tokens{}) -> {}",
        args.n,
        pixels[1],
        pixels[0],
        grid[1],
        grid[0],
        if grid == window {
            ""
        } else {
            ", sliding window"
        },
        args.out.display()
    );
    Ok(())
}

/// Arguments of `vqgan import-transformer`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The reference's YAML config (Net2NetTransformer).
    #[arg(long)]
    config: PathBuf,
    /// The Lightning `.ckpt` file.
    #[arg(long)]
    ckpt: PathBuf,
    /// Directory to write `transformer/`, `vqgan/` and (segmentation) `cond_vqgan/` into.
    #[arg(long)]
    out: PathBuf,
    /// Training window in tokens, WIDTHxHEIGHT (default: the permuter's grid, the first
    /// stage's grid, or 16x16, whichever the block size holds).
    #[arg(long)]
    window: Option<String>,
    /// Replace existing model directories.
    #[arg(long)]
    force: bool,
}

/// Runs `vqgan import-transformer`.
pub fn import(args: ImportArgs) -> Result<()> {
    let window = args.window.as_deref().map(parse_size).transpose()?;
    let device = burn::tensor::Device::flex();
    let m = net2net::import_net2net(&args.config, &args.ckpt, window, &device)
        .with_context(|| format!("importing {}", args.ckpt.display()))?;
    for name in &m.ignored {
        eprintln!("warning: checkpoint tensor `{name}` has no place in the models; skipped");
    }
    native::save_transformer(&args.out.join("transformer"), &m.config, &m.gpt, args.force)?;
    let none = Default::default();
    native::save_model(
        &args.out.join("vqgan"),
        &m.first_stage.0,
        &m.first_stage.1,
        &none,
        args.force,
    )?;
    if let Some((c, model)) = &m.cond_stage {
        native::save_model(&args.out.join("cond_vqgan"), c, model, &none, args.force)?;
    }
    println!(
        "imported {}: GPT {} layers x {} wide, {} window, {} conditioning -> {}",
        args.ckpt.display(),
        m.config.gpt.n_layer,
        m.config.gpt.n_embd,
        format_args!("{}x{}", m.config.window[0], m.config.window[1]),
        m.config.cond.name(),
        args.out.display()
    );
    Ok(())
}
