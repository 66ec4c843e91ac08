//! The run engine both stages go through: a [`Plan`] opens a [`Stage`] (fresh, or from the
//! run's latest checkpoint), and [`train`] drives it: the data-parallel group, the step loop
//! with its timing, evaluation and checkpoint cadence, attempt fencing, the object-store
//! uploader, the metrics (`metrics.csv` appended row by row, TensorBoard events, `loss.png`),
//! the per-step hook, and the stage's pictures and model at the end.
//!
//! Run folder: `checkpoints/` (see [`crate::checkpoint`]), `loader/` (the data position of
//! every rank but 0 at each checkpoint), `metrics.csv`, `tb/` (TensorBoard), `loss.png`, the
//! stage's pictures (`val_grid.png` or `samples.png`) and `model/`.

pub mod error;
mod log;
pub mod rows;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::{RunError, TrainError, output};
pub use rows::{Columns, Row};

use crate::checkpoint::{self, CheckpointError};
use crate::learner::Group;
use crate::metrics::StepTiming;
use crate::mirror::{self, Uploader};
use crate::settings::{RunContext, RunSettings};

/// What one optimizer step did, as the engine records it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The step's values, in the stage's [`Columns::values`] order.
    pub values: Vec<f64>,
    /// Training samples (images or tokens) the step consumed, over all ranks.
    pub samples: f64,
    /// Time spent waiting for batches.
    pub data_wait: Duration,
}

/// A picture a stage shows: its name (the PNG's stem and the TensorBoard tag) and pixels.
pub type Picture = (&'static str, image::RgbImage);

/// A training run in progress: a model, its optimizers and its data.
pub trait Stage: Sized {
    /// The stage's metric columns.
    fn columns(&self) -> Columns;
    /// Optimizer steps taken.
    fn step(&self) -> u64;
    /// Takes part in a data-parallel group from now on (parameters copied from rank 0).
    fn join(self, group: Group) -> Result<Self, RunError>;
    /// Time spent in collectives so far.
    fn comm_time(&self) -> Duration;
    /// One optimizer step (all its micro-batches).
    fn train_step(self) -> Result<(Self, StepOutput), RunError>;
    /// The validation metrics, one per [`Columns::val`] (the first: lower is better).
    fn evaluate(&self) -> Result<Vec<f64>, RunError>;
    /// What the model makes now, as pictures: at every evaluation, and at the end (`last`),
    /// when they are also written into the run folder.
    fn pictures(&self, last: bool) -> Result<Vec<Picture>, RunError>;
    /// Where this rank's training data stands (saved for ranks > 0 beside each checkpoint).
    fn data_position(&self) -> serde_json::Value;
    /// Writes a checkpoint of this step into `ckpt_dir`, keeping the newest `keep`.
    fn save_checkpoint(&self, ckpt_dir: &Path, keep: usize) -> Result<PathBuf, RunError>;
    /// Training samples skipped as unusable so far.
    fn skipped(&self) -> u64 {
        0
    }
    /// Writes the trained model into the run folder `out`.
    fn finish(&self, out: &Path) -> Result<(), RunError>;
}

/// How a run starts.
pub enum Start {
    /// A fresh run.
    New,
    /// From the latest checkpoint of this `checkpoints/` folder.
    Resume(PathBuf),
}

/// What to train: opens the [`Stage`] a run drives.
pub trait Plan {
    /// The stage it opens.
    type Stage: Stage;
    /// Checks what can be checked before the run folder is touched (config, shard lists).
    fn check(&self) -> Result<(), RunError>;
    /// Opens the stage for `run`.
    fn open(self, run: &RunSettings, start: Start) -> Result<Self::Stage, RunError>;
}

/// Called after every step with its row; returning false stops the run.
pub type StepHook = Box<dyn FnMut(&Columns, &Row) -> bool + Send>;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// The validation metric at the start of this invocation.
    pub first_val: f64,
    /// The validation metric at the end.
    pub last_val: f64,
    /// Training samples skipped as unusable.
    pub skipped: u64,
    /// The exported model directory.
    pub model_dir: PathBuf,
}

/// Runs (or resumes) the training `plan` describes with `run`'s settings; `hook` sees every
/// step's row, and `progress` shows a progress bar.
pub fn train<P: Plan>(
    plan: P,
    mut run: RunSettings,
    mut hook: Option<StepHook>,
    progress: bool,
) -> Result<RunSummary, RunError> {
    plan.check()?;
    std::fs::create_dir_all(&run.out).map_err(|e| output(&run.out, e))?;
    let ckpt_dir = run.out.join("checkpoints");
    let mut uploader = mirror::prepare(run.checkpoint_url.as_deref(), &run.out, run.resume)?;
    let start = if resumes(&run, &ckpt_dir)? {
        Start::Resume(ckpt_dir.clone())
    } else {
        Start::New
    };
    let mut stage = plan.open(&run, start)?;
    let columns = stage.columns();
    let lead = run.rank == 0;
    let mut log = log::MetricsLog::open(&run.out, &columns, stage.step(), lead)?;
    if let Some(group) = run.group.take() {
        stage = stage.join(Group::new(group))?;
    }
    if lead {
        checkpoint::claim(&ckpt_dir, run.attempt)?;
        uploader.claim(&run.out)?;
    }
    let first_val = first(&stage.evaluate()?);
    let mut last_val = first_val;
    let bar = progress_bar(progress, run.steps, stage.step());
    while stage.step() < run.steps {
        let step_span = tracing::info_span!("step", step = stage.step() + 1);
        let _in_step = step_span.enter();
        let started = Instant::now();
        let comm_before = stage.comm_time();
        let before = stage.step();
        let (next, out) = stage.train_step()?;
        stage = next;
        crate::liveness::beat();
        if stage.step() <= before {
            // The stage went back to a checkpoint (divergence): so do the metrics.
            log.rewind(stage.step())?;
            bar.set_position(stage.step());
            continue;
        }
        let timing = StepTiming {
            data_wait_s: out.data_wait.as_secs_f64(),
            allreduce_s: (stage.comm_time() - comm_before).as_secs_f64(),
            step_s: started.elapsed().as_secs_f64(),
        };
        let step = stage.step();
        let evaluate = step % run.eval_every.max(1) == 0 || step == run.steps;
        let val = if evaluate {
            let val = stage.evaluate()?;
            crate::liveness::beat();
            Some(val)
        } else {
            None
        };
        let row = Row {
            step,
            values: out.values,
            rate: out.samples / timing.step_s,
            val,
            timing,
        };
        last_val = row.first_val().unwrap_or(last_val);
        log.append(&row)?;
        if evaluate && step < run.steps && lead {
            log.pictures(step, &stage.pictures(false)?)?;
            crate::liveness::beat();
        }
        bar.set_position(step);
        bar.set_message(message(&columns, &row, last_val));
        if step % run.checkpoint_every.max(1) == 0 || step == run.steps {
            save(&run, &stage, &mut uploader)?;
            crate::liveness::beat();
        }
        if let Some(hook) = hook.as_mut()
            && !hook(&columns, &row)
        {
            return Err(RunError::Stopped(step));
        }
    }
    bar.finish();
    if lead {
        // The upload in flight reads files that the outputs rewrite.
        uploader.wait()?;
        log.finish()?;
        let pictures = stage.pictures(true)?;
        crate::liveness::beat();
        log.pictures(stage.step(), &pictures)?;
        for (name, picture) in &pictures {
            let path = run.out.join(format!("{name}.png"));
            taming_model::image_io::write_png(picture, &path)?;
        }
        stage.finish(&run.out)?;
        uploader.push_outputs(&run.out)?;
    }
    Ok(RunSummary {
        steps: stage.step(),
        first_val,
        last_val,
        skipped: stage.skipped(),
        model_dir: run.out.join("model"),
    })
}

/// The first of a stage's validation metrics.
fn first(values: &[f64]) -> f64 {
    values.first().copied().unwrap_or(f64::NAN)
}

/// Whether the run continues from the checkpoint in `ckpt_dir`. A run folder holding a run is
/// refused unless resuming, and resuming without a checkpoint is refused.
fn resumes(run: &RunSettings, ckpt_dir: &Path) -> Result<bool, RunError> {
    let has_checkpoint = ckpt_dir.join(checkpoint::LATEST).exists();
    if has_checkpoint && !run.resume {
        return Err(output(
            &run.out,
            "holds a run already: pass --resume to continue it, or choose another --out",
        ));
    }
    if !has_checkpoint && run.resume {
        return Err(CheckpointError::new(ckpt_dir, "no checkpoint to resume from").into());
    }
    Ok(has_checkpoint)
}

/// A checkpoint step: rank 0 writes the checkpoint and uploads it with the metrics so far;
/// every other rank saves its data position.
fn save<S: Stage>(run: &RunSettings, stage: &S, uploader: &mut Uploader) -> Result<(), RunError> {
    let ckpt_dir = run.out.join("checkpoints");
    checkpoint::check_fence(&ckpt_dir, run.attempt)?;
    if run.rank != 0 {
        return save_position(run, stage.step(), &stage.data_position(), uploader);
    }
    // The previous upload reads the files this step rewrites or prunes.
    uploader.wait()?;
    let dir = stage.save_checkpoint(&ckpt_dir, run.keep)?;
    uploader.push_checkpoint(&run.out, &dir)?;
    Ok(())
}

/// The run-relative name of a rank's data position at a checkpoint step.
fn position_file(rank: usize, world: usize, step: u64) -> String {
    format!("loader/rank-{rank:04}-of-{world:04}-step-{step:08}.json")
}

/// Writes rank r's data position, and copies it to the run's object-store copy.
fn save_position(
    run: &RunSettings,
    step: u64,
    position: &impl Serialize,
    uploader: &Uploader,
) -> Result<(), RunError> {
    let rel = position_file(run.rank, run.world, step);
    let path = run.out.join(&rel);
    let json = serde_json::to_vec(position).expect("a position serializes");
    std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(|e| output(&path, e))?;
    taming_model::atomic::write(&path, &json).map_err(|e| output(&path, e))?;
    Ok(uploader.push_file(&run.out, &rel)?)
}

/// This rank's data position saved at checkpoint `step` (ranks > 0), if there is one: none
/// when the world size changed since the checkpoint, or this rank is new.
pub fn saved_position<T: DeserializeOwned>(run: &RunContext, step: u64) -> Option<T> {
    if run.rank == 0 {
        return None;
    }
    let path = run.out.join(position_file(run.rank, run.world, step));
    let position = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if position.is_none() {
        tracing::warn!(
            rank = run.rank,
            step,
            "no saved data position for this rank"
        );
    }
    position
}

fn progress_bar(show: bool, steps: u64, position: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps).with_position(position);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
        .expect("valid template");
    bar.set_style(style);
    bar
}

/// The progress bar's message: the step's values, the latest validation metric, the rate.
fn message(columns: &Columns, row: &Row, last_val: f64) -> String {
    let values: Vec<String> = columns
        .values
        .iter()
        .zip(&row.values)
        .map(|(name, v)| format!("{name} {v:.4}"))
        .collect();
    format!(
        "{} | {} {last_val:.4} | {:.1} {}",
        values.join(" "),
        columns.val.first().map_or("val", String::as_str),
        row.rate,
        columns.rate
    )
}
