//! A whole stage-1 run on local shards: the training loop with evaluation, checkpoints,
//! `metrics.csv`, the loss curve, the validation grid and the exported model.
//!
//! Run folder: `checkpoints/` (see [`crate::checkpoint`]), `metrics.csv`, `loss.png`,
//! `val_grid.png` (inputs beside reconstructions) and `model/` (the project's model format,
//! for `vqgan encode|decode|reconstruct|eval`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, DataError, ImageBatch, LoaderConfig, LoaderState, Preprocess, ReaderConfig,
    ShardLoader,
};
use taming_model::checkpoint::native;
use taming_model::image_io::to_image;
use taming_model::quantize::QuantizeMode;

use super::config::{Objective, Stage1Config};
use super::report::{self, MetricsRow};
use super::trainer::{Stage1Trainer, StepReport, TrainError};
use crate::checkpoint::{self, CheckpointError};
use crate::metrics::StepTiming;
use crate::mirror::{self, Uploader};
use crate::settings::RunSettings;

/// Called after every step with its metrics row; returning false stops the run.
pub type StepHook = Box<dyn FnMut(&MetricsRow) -> bool + Send>;

/// How to run.
pub struct RunOptions {
    /// Training settings.
    pub config: Stage1Config,
    /// Directory or object-store prefix with `train-*.tar` and `val-*.tar` shards.
    pub data: String,
    /// Dataloader service instances to stream training batches from (none: read locally).
    pub dataloaders: Vec<String>,
    /// Show a progress bar.
    pub progress: bool,
    /// Called after every step with its metrics row; returning false stops the run.
    pub on_step: Option<StepHook>,
    /// The run folder, its length and its place in the job.
    pub run: RunSettings,
}

impl RunOptions {
    /// A run of `config` on the shards of `data` (read locally, no progress bar).
    pub fn new(config: Stage1Config, data: String, run: RunSettings) -> Self {
        Self {
            config,
            data,
            dataloaders: Vec::new(),
            progress: false,
            on_step: None,
            run,
        }
    }

    /// A single-process run (see [`RunSettings::single`]).
    pub fn single(
        config: Stage1Config,
        data: String,
        out: PathBuf,
        steps: u64,
        device: Device,
    ) -> Self {
        Self::new(config, data, RunSettings::single(out, steps, device))
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Validation L1 at the start of this invocation.
    pub first_val_l1: f64,
    /// Validation L1 at the end.
    pub last_val_l1: f64,
    /// Training samples skipped as unusable.
    pub skipped: u64,
    /// The exported model directory.
    pub model_dir: PathBuf,
}

/// Errors of a run: training errors, data errors, or an output folder that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Training could not start or go on.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The data-parallel group failed (a peer died or timed out).
    #[error(transparent)]
    Collective(#[from] taming_collective::CollectiveError),
    /// The coordinator asked the run to stop.
    #[error("stopped by the coordinator at step {0}")]
    Stopped(u64),
    /// An output could not be written.
    #[error("{}: {reason}", path.display())]
    Output {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// An output file or folder that could not be written or used.
pub(crate) fn output(path: &Path, reason: impl ToString) -> RunError {
    RunError::Output {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Whether the run continues from the checkpoint in `ckpt_dir`. A run folder holding a run is
/// refused unless resuming, and resuming without a checkpoint is refused.
pub(crate) fn resumes(run: &RunSettings, ckpt_dir: &Path) -> Result<bool, RunError> {
    let has_checkpoint = ckpt_dir.join(checkpoint::LATEST).exists();
    if has_checkpoint && !run.resume {
        return Err(output(
            &run.out,
            "holds a run already: pass --resume to continue it, or choose another --out",
        ));
    }
    if !has_checkpoint && run.resume {
        let e = CheckpointError::new(ckpt_dir, "no checkpoint to resume from");
        return Err(TrainError::from(e).into());
    }
    Ok(has_checkpoint)
}

/// Runs (or resumes) stage-1 training.
pub fn run_stage1(mut opts: RunOptions) -> Result<RunSummary, RunError> {
    opts.config.validate().map_err(TrainError::from)?;
    let train_shards = list_split(&opts.data, "train")?;
    let val_shards = list_split(&opts.data, "val")?;
    std::fs::create_dir_all(&opts.run.out).map_err(|e| output(&opts.run.out, e))?;
    let ckpt_dir = opts.run.out.join("checkpoints");
    let mut uploader = mirror::prepare(
        opts.run.checkpoint_url.as_deref(),
        &opts.run.out,
        opts.run.resume,
    )
    .map_err(TrainError::from)?;
    let (mut trainer, state, mut rows) = start(&opts, &ckpt_dir)?;
    if let Some(group) = opts.run.group.take() {
        trainer.join_group(group)?;
    }
    let lead = opts.run.rank == 0;
    if lead {
        checkpoint::claim(&ckpt_dir, opts.run.attempt).map_err(TrainError::from)?;
        uploader.claim(&opts.run.out).map_err(TrainError::from)?;
    }
    let size = opts.config.model.ddconfig.resolution;
    let loader_cfg = |batch_size, train: bool| LoaderConfig {
        batch_size,
        preprocess: Preprocess {
            size,
            random_crop: train,
            flip: train && opts.config.flip,
        },
        reader: ReaderConfig {
            shuffle_shards: train,
            seed: opts.config.seed,
            ..ReaderConfig::default()
        },
        require_masks: opts.config.needs_label_maps(),
    };
    let mut train_cfg = loader_cfg(opts.config.batch_size, true);
    train_cfg.reader.rank = opts.run.rank;
    train_cfg.reader.world_size = opts.run.world;
    let source: Box<dyn BatchSource> = if opts.dataloaders.is_empty() {
        Box::new(ShardLoader::open(&train_shards, train_cfg, &state)?)
    } else {
        Box::new(RemoteLoader::new(
            opts.dataloaders.clone(),
            train_shards,
            train_cfg,
            state,
        ))
    };
    let mut loader = opts.run.ahead(source);
    let val = ShardLoader::open(&val_shards, loader_cfg(16, false), &LoaderState::default())?
        .next_in_epoch()?
        .ok_or_else(|| {
            output(
                Path::new(&opts.data),
                "the validation shards hold no usable sample",
            )
        })?;
    let val_x = trainer.input(&val).map_err(TrainError::from)?;
    let first_val_l1 = trainer.eval_l1(val_x.clone());
    let bar = progress_bar(&opts, trainer.step());
    let mut last_val_l1 = first_val_l1;
    while trainer.step() < opts.run.steps {
        let step_span = tracing::info_span!("step", step = trainer.step() + 1);
        let _in_step = step_span.enter();
        let started = Instant::now();
        let comm_before = trainer.comm_time();
        let (report, data_wait) = train_step(&mut trainer, loader.as_mut())?;
        let timing = StepTiming {
            data_wait_s: data_wait.as_secs_f64(),
            allreduce_s: (trainer.comm_time() - comm_before).as_secs_f64(),
            step_s: started.elapsed().as_secs_f64(),
        };
        let ips = (opts.config.batch_size * opts.config.grad_accum) as f64 / timing.step_s;
        let step = report.step;
        let evaluate = step % opts.run.eval_every.max(1) == 0 || step == opts.run.steps;
        let val_l1 = evaluate.then(|| trainer.eval_l1(val_x.clone()));
        last_val_l1 = val_l1.unwrap_or(last_val_l1);
        rows.push(MetricsRow {
            timing,
            ..row(&report, ips, val_l1)
        });
        bar.set_position(step);
        bar.set_message(message(&report, ips, last_val_l1));
        if step % opts.run.checkpoint_every.max(1) == 0 || step == opts.run.steps {
            checkpoint::check_fence(&ckpt_dir, opts.run.attempt).map_err(TrainError::from)?;
            if lead {
                // The previous upload reads the files this step rewrites or prunes.
                uploader.wait().map_err(TrainError::from)?;
                let dir = trainer
                    .save_checkpoint(&ckpt_dir, loader.state(), opts.run.keep)
                    .map_err(TrainError::from)?;
                report::write_csv(&opts.run.out.join("metrics.csv"), &rows)
                    .map_err(|e| output(&opts.run.out.join("metrics.csv"), e))?;
                uploader
                    .push_checkpoint(&opts.run.out, &dir)
                    .map_err(TrainError::from)?;
            } else {
                save_rank_state(&opts, step, &loader.state(), &uploader)?;
            }
        }
        if let Some(on_step) = opts.on_step.as_mut()
            && !on_step(rows.last().expect("pushed"))
        {
            return Err(RunError::Stopped(step));
        }
    }
    bar.finish();
    if lead {
        // The upload in flight reads files that `finish` rewrites.
        uploader.wait().map_err(TrainError::from)?;
        finish(&opts, &trainer, &val, val_x, &rows)?;
        uploader
            .push_outputs(&opts.run.out)
            .map_err(TrainError::from)?;
    }
    Ok(RunSummary {
        steps: trainer.step(),
        first_val_l1,
        last_val_l1,
        skipped: loader.skipped(),
        model_dir: opts.run.out.join("model"),
    })
}

fn start(
    opts: &RunOptions,
    ckpt_dir: &Path,
) -> Result<(Stage1Trainer, LoaderState, Vec<MetricsRow>), RunError> {
    if !resumes(&opts.run, ckpt_dir)? {
        let trainer = Stage1Trainer::new(opts.config.clone(), opts.run.nodes, &opts.run.device)
            .map_err(TrainError::from)?;
        return Ok((trainer, LoaderState::default(), Vec::new()));
    }
    let (trainer, state) = Stage1Trainer::resume(ckpt_dir, opts.run.nodes, &opts.run.device)?;
    let state = if opts.run.rank == 0 {
        state
    } else {
        load_rank_state(opts, trainer.step(), state.epoch)
    };
    let rows = report::read_csv(&opts.run.out.join("metrics.csv"))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.step <= trainer.step())
        .collect();
    Ok((trainer, state, rows))
}

/// The data position of rank r > 0 at a checkpoint step (rank 0's is in the checkpoint).
fn rank_state_path(opts: &RunOptions, step: u64) -> PathBuf {
    opts.run.out.join(rank_state_file(opts, step))
}

/// The run-relative name of a rank's data position.
fn rank_state_file(opts: &RunOptions, step: u64) -> String {
    format!(
        "loader/rank-{:04}-of-{:04}-step-{step:08}.json",
        opts.run.rank, opts.run.world
    )
}

/// Writes rank r's data position, and copies it to the run's object-store copy.
fn save_rank_state(
    opts: &RunOptions,
    step: u64,
    state: &LoaderState,
    uploader: &Uploader,
) -> Result<(), RunError> {
    let path = rank_state_path(opts, step);
    let json = serde_json::to_vec(state).expect("state serializes");
    std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(|e| output(&path, e))?;
    taming_model::atomic::write(&path, &json).map_err(|e| output(&path, e))?;
    uploader
        .push_file(&opts.run.out, &rank_state_file(opts, step))
        .map_err(|e| TrainError::from(e).into())
}

/// Rank r's saved position, or the start of rank 0's epoch when there is none (the world
/// size changed since the checkpoint, or this rank is new).
fn load_rank_state(opts: &RunOptions, step: u64, epoch: u64) -> LoaderState {
    let path = rank_state_path(opts, step);
    match std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(state) => state,
        None => {
            tracing::warn!(
                rank = opts.run.rank,
                step,
                "no saved data position; starting epoch {epoch} afresh"
            );
            LoaderState {
                epoch,
                ..LoaderState::default()
            }
        }
    }
}

/// One optimizer step; returns its report and the time spent waiting for batches.
fn train_step(
    trainer: &mut Stage1Trainer,
    loader: &mut dyn BatchSource,
) -> Result<(StepReport, std::time::Duration), RunError> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        let asked = Instant::now();
        let batch: ImageBatch =
            tracing::info_span!("data_wait").in_scope(|| loader.next_batch())?;
        waited += asked.elapsed();
        let x = trainer.input(&batch).map_err(TrainError::from)?;
        let cond = trainer.condition(&batch).map_err(TrainError::from)?;
        if let Some(report) = trainer.try_train_batch_with(x, cond)? {
            return Ok((report, waited));
        }
    }
}

fn row(r: &StepReport, ips: f64, val_l1: Option<f64>) -> MetricsRow {
    let g = &r.generator;
    MetricsRow {
        step: r.step,
        total: g.total,
        nll: g.nll,
        l1: g.l1,
        p_loss: g.p_loss,
        quant: g.quant,
        g_loss: g.g_loss,
        d_loss: r.d_loss.unwrap_or(0.0),
        d_weight: g.d_weight,
        usage: r.usage.unwrap_or(0.0),
        images_per_s: ips,
        val_l1,
        timing: StepTiming::default(),
    }
}

fn progress_bar(opts: &RunOptions, position: u64) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(opts.run.steps).with_position(position);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
        .expect("valid template");
    bar.set_style(style);
    bar
}

fn message(r: &StepReport, ips: f64, val_l1: f64) -> String {
    let g = &r.generator;
    format!(
        "l1 {:.4} nll {:.4} q {:.4} g {:.3} d {:.3} lambda {:.3} usage {:.0}% val {:.4} | {:.1} img/s",
        g.l1,
        g.nll,
        g.quant,
        g.g_loss,
        r.d_loss.unwrap_or(0.0),
        g.d_weight,
        100.0 * r.usage.unwrap_or(0.0),
        val_l1,
        ips
    )
}

/// The first map of `[b, labels, h, w]` scores as colors (label of the highest score; label 0
/// black).
fn label_image(t: Tensor<4>) -> image::RgbImage {
    let [_, c, h, w] = t.dims();
    let labels: Vec<i64> = t
        .narrow(0, 0, 1)
        .argmax(1)
        .try_into_vec_as::<i64>()
        .expect("int labels");
    let _ = c;
    image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let l = labels[y as usize * w + x as usize] as u32;
        if l == 0 {
            return image::Rgb([0, 0, 0]);
        }
        let hue = l.wrapping_mul(0x9E37_79B9);
        image::Rgb([
            (hue >> 24) as u8 | 64,
            (hue >> 16) as u8 | 64,
            (hue >> 8) as u8 | 64,
        ])
    })
}

/// Loss curve, validation grid and exported model.
fn finish(
    opts: &RunOptions,
    trainer: &Stage1Trainer,
    val: &ImageBatch,
    val_x: Tensor<4>,
    rows: &[MetricsRow],
) -> Result<(), RunError> {
    report::write_csv(&opts.run.out.join("metrics.csv"), rows)
        .map_err(|e| output(&opts.run.out.join("metrics.csv"), e))?;
    let loss_png = opts.run.out.join("loss.png");
    report::plot_losses(&loss_png, rows).map_err(|e| output(&loss_png, e))?;
    let model = trainer.model().valid();
    let x = val_x.inner();
    let rec = model.forward(x.clone(), QuantizeMode::EVAL).reconstruction;
    let n = val.shape[0];
    let picture = |t: Tensor<4>| match trainer.objective() {
        Objective::Vqgan => to_image(t),
        Objective::Segmentation => label_image(t),
    };
    let inputs: Vec<_> = (0..n).map(|i| picture(x.clone().narrow(0, i, 1))).collect();
    let recs: Vec<_> = (0..n)
        .map(|i| picture(rec.clone().narrow(0, i, 1)))
        .collect();
    let grid = opts.run.out.join("val_grid.png");
    report::write_grid(&grid, &inputs, &recs).map_err(|e| output(&grid, e))?;
    native::save_model(
        &opts.run.out.join("model"),
        &opts.config.model,
        &model,
        &BTreeMap::new(),
        true,
    )
    .map_err(|e| output(&opts.run.out.join("model"), e))
}
