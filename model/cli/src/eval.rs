//! `vqgan eval`: reconstruction quality of a model over a shard set. rFID is the FID of the
//! reconstructions against the images they reconstruct, both quantized to 8 bits first as
//! the PNGs `vqgan reconstruct` writes are (so it equals `vqgan fid` on folders of both).

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, LoaderConfig, LoaderState, Prefetched, Preprocess, ShardLoader,
};
use taming_model::checkpoint::native;
use taming_model::device::DeviceSpec;
use taming_model::fid::{StatsAccumulator, frechet_distance};
use taming_model::inception::{FEATURES, eight_bit};
use taming_model::loss::LpipsConfig;
use taming_model::metrics;
use taming_model::quantize::QuantizeMode;

use crate::fid::{Extractor, InceptionArgs};

/// The report written as JSON.
#[derive(Debug, Serialize)]
struct Report {
    images: usize,
    l1: f64,
    psnr: f64,
    ssim: f64,
    lpips: Option<f64>,
    rfid: Option<f64>,
    codebook_usage: f64,
    codes_used: usize,
    n_embed: usize,
    skipped: u64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// What `vqgan eval` measures, and where.
pub struct EvalJob<'a> {
    /// The model directory.
    pub model_dir: &'a Path,
    /// The device to run on.
    pub device: DeviceSpec,
    /// The shards' directory or URL prefix.
    pub data: &'a Path,
    /// The split (`{split}-*.tar`).
    pub split: &'a str,
    /// Images per batch.
    pub batch_size: usize,
    /// LPIPS weights, for the LPIPS column.
    pub lpips: Option<LpipsConfig>,
    /// Inception weights, for rFID.
    pub inception: &'a InceptionArgs,
    /// Where the JSON report goes.
    pub out: &'a Path,
}

/// Evaluates the model of `job` on its split and writes the report.
pub fn run(job: EvalJob) -> Result<()> {
    let EvalJob {
        model_dir,
        device,
        data,
        split,
        batch_size,
        lpips,
        inception,
        out,
    } = job;
    let device = device.device().map_err(anyhow::Error::msg)?;
    let (config, model) = native::load_model(model_dir, &device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let lpips = lpips
        .map(|cfg| taming_import::load_lpips(&cfg, &device))
        .transpose()?;
    let extractor = inception
        .inception
        .is_some()
        .then(|| Extractor::load(inception, &device, batch_size))
        .transpose()?;
    // Statistics of the images and of their reconstructions.
    let mut fid_stats = [
        StatsAccumulator::new(FEATURES),
        StatsAccumulator::new(FEATURES),
    ];
    let shards = list_split(data, split)?;
    let size = config.ddconfig.resolution;
    let preprocess = Preprocess {
        size,
        random_crop: false,
        flip: false,
    };
    let cfg = LoaderConfig::simple(batch_size.max(1), preprocess, 0, false);
    // Decoding the next batches overlaps the model's work on this one.
    let mut loader =
        Prefetched::epoch(ShardLoader::open(&shards, cfg, &LoaderState::default())?, 2);
    let (mut l1, mut psnr, mut ssim, mut perceptual) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut used = vec![false; config.n_embed];
    while let Some(batch) = loader.next_in_epoch()? {
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &device);
        let out = model.forward(x.clone(), QuantizeMode::EVAL);
        for code in out
            .quantized
            .indices
            .try_into_vec_as::<i64>()
            .context("indices")?
        {
            used[code as usize] = true;
        }
        // Clamped as the reference logs reconstructions (and as training validates).
        let rec = out.reconstruction.clamp(-1.0, 1.0);
        if let Some(ex) = &extractor {
            let [images, reconstructions] = &mut fid_stats;
            ex.add_batch(images, eight_bit(x.clone()))?;
            ex.add_batch(reconstructions, eight_bit(rec.clone()))?;
        }
        l1.extend(metrics::l1(x.clone(), rec.clone()));
        psnr.extend(metrics::psnr(x.clone(), rec.clone()));
        ssim.extend(metrics::ssim(x.clone(), rec.clone()));
        if let Some(lpips) = &lpips {
            let d = lpips
                .forward(x, rec)
                .try_into_vec_as::<f32>()
                .context("lpips")?;
            perceptual.extend(d.into_iter().map(f64::from));
        }
    }
    let rfid = match extractor {
        Some(_) => {
            let [images, reconstructions] = fid_stats;
            Some(frechet_distance(
                &images.finish()?,
                &reconstructions.finish()?,
            )?)
        }
        None => None,
    };
    let codes_used = used.iter().filter(|u| **u).count();
    let report = Report {
        images: l1.len(),
        l1: mean(&l1),
        psnr: mean(&psnr),
        ssim: mean(&ssim),
        lpips: lpips.as_ref().map(|_| mean(&perceptual)),
        rfid,
        codebook_usage: codes_used as f64 / config.n_embed as f64,
        codes_used,
        n_embed: config.n_embed,
        skipped: loader.skipped(),
    };
    let lp = report.lpips.map_or("-".into(), |v| format!("{v:.4}"));
    let rfid = report.rfid.map_or("-".into(), |v| format!("{v:.4}"));
    println!(
        "{} images: L1 {:.4}  PSNR {:.2} dB  SSIM {:.4}  LPIPS {lp}  rFID {rfid}  usage {:.1}% \
         ({}/{} codes)",
        report.images,
        report.l1,
        report.psnr,
        report.ssim,
        100.0 * report.codebook_usage,
        codes_used,
        config.n_embed
    );
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    taming_model::atomic::write(out, json.as_bytes())?;
    Ok(())
}
