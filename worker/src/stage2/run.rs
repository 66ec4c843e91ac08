//! A whole stage-2 run: the data (code Parquet, or images encoded on the fly by the frozen
//! VQGAN), the training loop with evaluation and checkpoints, and at the end `metrics.csv`,
//! `samples.png` (decoded samples, one row per condition) and `model/` (the transformer
//! directory for `vqgan sample`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader,
};
use taming_model::checkpoint::native;
use taming_model::image_io::{tile, write_png};
use taming_model::synthesis::{SynthCond, Synthesizer};
use taming_model::transformer::{Conditioning, GridCond, Sampling};
use taming_model::{Vqgan, VqganConfig};

use super::config::Stage2Config;
use super::data::{CodeSample, CodeSampler, check_samples, encode_batch, read_code_set};
use super::trainer::{DataPosition, Stage2Report, Stage2Trainer};
use crate::metrics::StepTiming;
use crate::mirror;
use crate::settings::RunSettings;
use crate::stage1::RunError;
use crate::stage1::run::{output, resumes};
use crate::stage1::trainer::TrainError;

/// What the transformer is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondKind {
    /// Nothing.
    None,
    /// The samples' class labels.
    Class,
    /// The samples' segmentation codes (from a cond-stage VQGAN).
    Segmentation,
}

impl std::str::FromStr for CondKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "none" => Ok(Self::None),
            "class" => Ok(Self::Class),
            "segmentation" => Ok(Self::Segmentation),
            _ => Err(format!("cond `{s}`: expected none, class or segmentation")),
        }
    }
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage2Row {
    /// Step after the update.
    pub step: u64,
    /// Training cross-entropy.
    pub loss: f64,
    /// Validation cross-entropy when evaluated.
    pub val_loss: Option<f64>,
    /// Learning rate.
    pub lr: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Where the step's time went (not in the CSV).
    pub timing: StepTiming,
}

/// Called after every step; returning false stops the run.
pub type Stage2Hook = Box<dyn FnMut(&Stage2Row) -> bool + Send>;

/// How to run stage 2.
pub struct Stage2Options {
    /// Training settings.
    pub config: Stage2Config,
    /// The frozen first stage (a VQGAN model directory).
    pub vqgan: PathBuf,
    /// Conditioning.
    pub cond: CondKind,
    /// The cond-stage VQGAN (segmentation).
    pub cond_vqgan: Option<PathBuf>,
    /// Code Parquet for training (file, or directory with `_manifest.json`); none: encode
    /// the image shards of `data` on the fly.
    pub codes: Option<String>,
    /// Code Parquet for validation.
    pub val_codes: Option<String>,
    /// Image shards (`train-*.tar`, `val-*.tar`) when no codes are given.
    pub data: String,
    /// Called after every step.
    pub on_step: Option<Stage2Hook>,
    /// The run folder, its length and its place in the job.
    pub run: RunSettings,
}

impl Stage2Options {
    /// A run of `config` over the codes of the frozen `vqgan` (model directory), conditioned
    /// on `cond`, with the image shards of `data` encoded on the fly.
    pub fn new(
        config: Stage2Config,
        (vqgan, cond): (PathBuf, CondKind),
        data: String,
        run: RunSettings,
    ) -> Self {
        Self {
            config,
            vqgan,
            cond,
            cond_vqgan: None,
            codes: None,
            val_codes: None,
            data,
            on_step: None,
            run,
        }
    }

    /// A single-process run (see [`RunSettings::single`]).
    pub fn single(
        config: Stage2Config,
        vqgan: PathBuf,
        cond: CondKind,
        data: String,
        out: PathBuf,
        steps: u64,
        device: Device,
    ) -> Self {
        Self::new(
            config,
            (vqgan, cond),
            data,
            RunSettings::single(out, steps, device),
        )
    }
}

/// How a stage-2 run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage2Summary {
    /// Steps done in total.
    pub steps: u64,
    /// Validation loss at the start of this invocation.
    pub first_val_loss: f64,
    /// Validation loss at the end.
    pub last_val_loss: f64,
    /// The exported transformer directory.
    pub model_dir: PathBuf,
}

fn train_error(e: TrainError) -> RunError {
    match e {
        TrainError::Collective(c) => RunError::Collective(c),
        other => RunError::Train(other),
    }
}

/// Training batches: code rows, or image shards through the frozen VQGAN.
enum Batches {
    Codes(CodeSampler),
    Images(Box<(Box<dyn BatchSource>, Vqgan, Device)>),
}

impl Batches {
    fn next(&mut self, n: usize) -> Result<Vec<CodeSample>, RunError> {
        match self {
            Self::Codes(s) => Ok(s.next_batch(n)),
            Self::Images(parts) => {
                let (loader, vq, device) = parts.as_mut();
                Ok(encode_batch(vq, &loader.next_batch()?, device))
            }
        }
    }

    fn position(&self) -> DataPosition {
        match self {
            Self::Codes(s) => DataPosition {
                codes: Some(s.position()),
                images: None,
            },
            Self::Images(parts) => DataPosition {
                codes: None,
                images: Some(parts.0.state()),
            },
        }
    }
}

struct Models {
    vqgan: (VqganConfig, Vqgan),
    cond_vqgan: Option<(VqganConfig, Vqgan)>,
}

fn load_models(opts: &Stage2Options, device: &Device) -> Result<Models, RunError> {
    let vqgan = native::load_model(&opts.vqgan, device).map_err(TrainError::from)?;
    let cond_vqgan = match (&opts.cond_vqgan, opts.cond) {
        (Some(dir), CondKind::Segmentation) => {
            Some(native::load_model(dir, device).map_err(TrainError::from)?)
        }
        (None, CondKind::Segmentation) => {
            return Err(output(
                &opts.run.out,
                "--cond segmentation needs --cond-vqgan (the VQGAN that encoded the maps)",
            ));
        }
        _ => None,
    };
    Ok(Models { vqgan, cond_vqgan })
}

fn image_loader(
    opts: &Stage2Options,
    size: usize,
    split: &str,
    batch: usize,
    state: &LoaderState,
    train: bool,
) -> Result<ShardLoader, RunError> {
    let shards = list_split(&opts.data, split)?;
    let mut reader = ReaderConfig {
        shuffle_shards: train,
        seed: opts.config.seed,
        ..ReaderConfig::default()
    };
    if train {
        reader.rank = opts.run.rank;
        reader.world_size = opts.run.world;
    }
    let cfg = LoaderConfig {
        batch_size: batch,
        preprocess: Preprocess {
            size,
            random_crop: false,
            flip: false,
        },
        reader,
        require_masks: false,
    };
    Ok(ShardLoader::open(&shards, cfg, state)?)
}

/// The data before batching: all code rows, or the image shards (validation encoded).
struct Data {
    /// Training rows (code Parquet only).
    rows: Option<Vec<CodeSample>>,
    /// Validation samples.
    val: Vec<CodeSample>,
    /// Where the data came from (for errors).
    source: String,
    /// Where the validation samples came from (for errors).
    val_source: String,
}

fn read_data(opts: &Stage2Options, models: &Models, inner: &Device) -> Result<Data, RunError> {
    if let Some(url) = &opts.codes {
        let rows = read_code_set(url)?;
        let (rows, val, val_source) = match &opts.val_codes {
            Some(v) => (rows, read_code_set(v)?, v.clone()),
            None => {
                let (train, val) = hold_out(rows);
                (train, val, url.clone())
            }
        };
        return Ok(Data {
            rows: Some(rows),
            val,
            source: url.clone(),
            val_source,
        });
    }
    if opts.cond == CondKind::Segmentation {
        return Err(output(
            &opts.run.out,
            "--cond segmentation trains from code Parquet (dataloader precompute-codes \
             --cond-vqgan): give --codes",
        ));
    }
    let mut val_loader = image_loader(
        opts,
        models.vqgan.0.ddconfig.resolution,
        "val",
        64,
        &LoaderState::default(),
        false,
    )?;
    let val = encode_batch(&models.vqgan.1, &val_loader.next_batch()?, inner);
    Ok(Data {
        rows: None,
        val,
        source: opts.data.clone(),
        val_source: opts.data.clone(),
    })
}

/// Most code rows held out for validation when no `--val-codes` is given.
const HELD_OUT_ROWS: usize = 64;

/// Splits validation rows off the training rows: a tenth of them, at most [`HELD_OUT_ROWS`]
/// and at least one, evenly spaced (every `len / k`-th row, the last of each stretch) so that
/// they come from every part of the set. A single row is kept for both.
fn hold_out(rows: Vec<CodeSample>) -> (Vec<CodeSample>, Vec<CodeSample>) {
    let len = rows.len();
    if len < 2 {
        tracing::warn!("{len} code row(s): none to hold out, validating on the training rows");
        return (rows.clone(), rows);
    }
    let k = (len / 10).clamp(1, HELD_OUT_ROWS);
    let stride = len / k;
    let (mut train, mut val) = (Vec::with_capacity(len - k), Vec::with_capacity(k));
    for (i, row) in rows.into_iter().enumerate() {
        if i % stride == stride - 1 && val.len() < k {
            val.push(row);
        } else {
            train.push(row);
        }
    }
    (train, val)
}

/// The transformer a fresh run builds: the VQGAN's codebook, the window (configured, else
/// the data's grid) and the conditioning (classes configured, else found in the code rows).
fn model_config(
    opts: &Stage2Options,
    models: &Models,
    data: &Data,
) -> Result<taming_model::transformer::TransformerConfig, RunError> {
    let first = data
        .val
        .first()
        .ok_or_else(|| output(Path::new(&data.val_source), "holds no samples"))?;
    let window = opts.config.window.unwrap_or(first.grid);
    let cond = match opts.cond {
        CondKind::None => Conditioning::None { sos_token: 0 },
        CondKind::Class => {
            let n_classes = match (opts.config.n_classes, &data.rows) {
                (Some(n), _) => n,
                (None, Some(rows)) => {
                    let max = rows.iter().filter_map(|r| r.label).max().ok_or_else(|| {
                        output(
                            Path::new(&data.source),
                            "`label` is empty in every row (class conditioning)",
                        )
                    })?;
                    max as usize + 1
                }
                (None, None) => {
                    return Err(output(
                        &opts.run.out,
                        "class conditioning on images needs `n_classes` in the stage-2 config",
                    ));
                }
            };
            Conditioning::Class { n_classes }
        }
        CondKind::Segmentation => {
            let (cfg, _) = models.cond_vqgan.as_ref().expect("checked in load_models");
            Conditioning::Segmentation {
                n_embed: cfg.n_embed,
                classes: cfg.ddconfig.in_channels,
            }
        }
    };
    let model = opts.config.model(models.vqgan.0.n_embed, window, cond);
    model.validate().map_err(TrainError::from)?;
    Ok(model)
}

fn open_batches(
    opts: &Stage2Options,
    models: &Models,
    data: &mut Data,
    inner: &Device,
    position: &DataPosition,
) -> Result<Batches, RunError> {
    if let Some(rows) = data.rows.take() {
        let pos = position.codes.clone().unwrap_or_default();
        return Ok(Batches::Codes(CodeSampler::new(
            rows,
            opts.run.rank,
            opts.run.world,
            opts.config.seed,
            pos,
        )));
    }
    let state = position.images.clone().unwrap_or_default();
    let loader = image_loader(
        opts,
        models.vqgan.0.ddconfig.resolution,
        "train",
        opts.config.batch_size,
        &state,
        true,
    )?;
    Ok(Batches::Images(Box::new((
        opts.run.ahead(Box::new(loader)),
        models.vqgan.1.clone(),
        inner.clone(),
    ))))
}

/// Runs (or resumes) stage-2 training.
pub fn run_stage2(mut opts: Stage2Options) -> Result<Stage2Summary, RunError> {
    opts.config.validate().map_err(TrainError::from)?;
    std::fs::create_dir_all(&opts.run.out).map_err(|e| output(&opts.run.out, e))?;
    let inner = opts.run.device.clone().inner();
    let models = load_models(&opts, &inner)?;
    let mut data = read_data(&opts, &models, &inner)?;
    let ckpt_dir = opts.run.out.join("checkpoints");
    let mut uploader = mirror::prepare(
        opts.run.checkpoint_url.as_deref(),
        &opts.run.out,
        opts.run.resume,
    )
    .map_err(|e| train_error(e.into()))?;
    let (mut trainer, position, mut rows) = start(&opts, &models, &data, &ckpt_dir)?;
    let model = trainer.layout().config().clone();
    if let Some(rows) = &data.rows {
        check_samples(rows, &model, &data.source)?;
    }
    check_samples(&data.val, &model, &data.val_source)?;
    if let Some(group) = opts.run.group.take() {
        trainer.join_group(group)?;
    }
    let mut batches = open_batches(&opts, &models, &mut data, &inner, &position)?;
    let lead = opts.run.rank == 0;
    if lead {
        crate::checkpoint::claim(&ckpt_dir, opts.run.attempt).map_err(|e| train_error(e.into()))?;
        uploader
            .claim(&opts.run.out)
            .map_err(|e| train_error(e.into()))?;
    }
    let first_val_loss = trainer.eval_loss(&data.val).map_err(train_error)?;
    let mut last_val_loss = first_val_loss;
    let tokens_per_step =
        (opts.config.batch_size * opts.config.grad_accum * model.window_tokens()) as f64;
    while trainer.step() < opts.run.steps {
        let step_span = tracing::info_span!("step", step = trainer.step() + 1);
        let _in_step = step_span.enter();
        let started = Instant::now();
        let comm_before = trainer.comm_time();
        let (report, data_wait) = train_step(
            &mut trainer,
            &mut batches,
            &model,
            &data.source,
            opts.config.batch_size,
        )?;
        let timing = StepTiming {
            data_wait_s: data_wait.as_secs_f64(),
            allreduce_s: (trainer.comm_time() - comm_before).as_secs_f64(),
            step_s: started.elapsed().as_secs_f64(),
        };
        let step = report.step;
        let evaluate = step % opts.run.eval_every.max(1) == 0 || step == opts.run.steps;
        let val_loss = if evaluate {
            Some(trainer.eval_loss(&data.val).map_err(train_error)?)
        } else {
            None
        };
        last_val_loss = val_loss.unwrap_or(last_val_loss);
        rows.push(Stage2Row {
            step,
            loss: report.loss,
            val_loss,
            lr: report.lr,
            tokens_per_s: tokens_per_step / timing.step_s,
            timing,
        });
        if lead && (step % opts.run.checkpoint_every.max(1) == 0 || step == opts.run.steps) {
            crate::checkpoint::check_fence(&ckpt_dir, opts.run.attempt)
                .map_err(|e| train_error(e.into()))?;
            // The previous upload reads the files this step rewrites or prunes.
            uploader.wait().map_err(|e| train_error(e.into()))?;
            let dir = trainer
                .save_checkpoint(&ckpt_dir, batches.position(), opts.run.keep)
                .map_err(|e| train_error(e.into()))?;
            write_metrics(&opts.run.out.join("metrics.csv"), &rows)?;
            uploader
                .push_checkpoint(&opts.run.out, &dir)
                .map_err(|e| train_error(e.into()))?;
        }
        if let Some(hook) = opts.on_step.as_mut()
            && !hook(rows.last().expect("pushed"))
        {
            return Err(RunError::Stopped(step));
        }
    }
    if lead {
        // The upload in flight reads files that `finish` rewrites.
        uploader.wait().map_err(|e| train_error(e.into()))?;
        finish(&opts, &trainer, &models, &data.val, &inner)?;
        uploader
            .push_outputs(&opts.run.out)
            .map_err(|e| train_error(e.into()))?;
    }
    Ok(Stage2Summary {
        steps: trainer.step(),
        first_val_loss,
        last_val_loss,
        model_dir: opts.run.out.join("model"),
    })
}

fn start(
    opts: &Stage2Options,
    models: &Models,
    data: &Data,
    ckpt_dir: &Path,
) -> Result<(Stage2Trainer, DataPosition, Vec<Stage2Row>), RunError> {
    if !resumes(&opts.run, ckpt_dir)? {
        let model = model_config(opts, models, data)?;
        let trainer = Stage2Trainer::new(
            opts.config.clone(),
            model,
            opts.run.nodes,
            opts.run.steps,
            &opts.run.device,
        )
        .map_err(train_error)?;
        return Ok((trainer, DataPosition::default(), Vec::new()));
    }
    let (trainer, position) =
        Stage2Trainer::resume(ckpt_dir, opts.run.nodes, opts.run.steps, &opts.run.device)
            .map_err(train_error)?;
    let rows = read_metrics(&opts.run.out.join("metrics.csv"))
        .into_iter()
        .filter(|r| r.step <= trainer.step())
        .collect();
    Ok((trainer, position, rows))
}

fn train_step(
    trainer: &mut Stage2Trainer,
    batches: &mut Batches,
    model: &taming_model::transformer::TransformerConfig,
    source: &str,
    batch_size: usize,
) -> Result<(Stage2Report, std::time::Duration), RunError> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        let asked = Instant::now();
        let batch = tracing::info_span!("data_wait").in_scope(|| batches.next(batch_size))?;
        waited += asked.elapsed();
        if let Batches::Images(..) = batches {
            check_samples(&batch, model, source)?;
        }
        if let Some(report) = trainer.train_batch(&batch).map_err(train_error)? {
            return Ok((report, waited));
        }
    }
}

const HEADER: &str = "step,loss,val_loss,lr,tokens_per_s";

fn write_metrics(path: &Path, rows: &[Stage2Row]) -> Result<(), RunError> {
    let mut text = format!("{HEADER}\n");
    for r in rows {
        let val = r.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
        text.push_str(&format!(
            "{},{:.6},{val},{:.3e},{:.1}\n",
            r.step, r.loss, r.lr, r.tokens_per_s
        ));
    }
    taming_model::atomic::write(path, text.as_bytes()).map_err(|e| output(path, e))
}

fn read_metrics(path: &Path) -> Vec<Stage2Row> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Some(Stage2Row {
                step: f.first()?.parse().ok()?,
                loss: f.get(1)?.parse().ok()?,
                val_loss: f.get(2)?.parse().ok(),
                lr: f.get(3)?.parse().ok()?,
                tokens_per_s: f.get(4)?.parse().ok()?,
                timing: StepTiming::default(),
            })
        })
        .collect()
}

/// The exported model and a grid of samples: one row per condition (up to 10 classes, the
/// first validation maps, or unconditional samples), 8 samples each.
fn finish(
    opts: &Stage2Options,
    trainer: &Stage2Trainer,
    models: &Models,
    val: &[CodeSample],
    inner: &Device,
) -> Result<(), RunError> {
    use burn::module::Module;
    let gpt = trainer.gpt().valid();
    let layout = trainer.layout();
    let model_dir = opts.run.out.join("model");
    native::save_transformer(&model_dir, layout.config(), &gpt, true)
        .map_err(|e| output(&model_dir, e))?;
    let synth = Synthesizer {
        gpt: &gpt,
        layout,
        vqgan: (&models.vqgan.0, &models.vqgan.1),
        cond_vqgan: models.cond_vqgan.as_ref().map(|(c, m)| (c, m)),
        device: inner.clone(),
    };
    let window = layout.config().window;
    let offset = layout.config().cond_offset() as i64;
    let conds: Vec<GridCond> = match &layout.config().cond {
        Conditioning::None { .. } => vec![
            synth
                .grid_cond(&SynthCond::None, window)
                .map_err(TrainError::from)?,
        ],
        Conditioning::Class { n_classes } => (0..(*n_classes).min(10) as i64)
            .map(|c| synth.grid_cond(&SynthCond::Class(c), window))
            .collect::<Result<_, _>>()
            .map_err(TrainError::from)?,
        Conditioning::Segmentation { .. } => val
            .iter()
            .take(4)
            .filter_map(|s| s.cond.as_ref())
            .map(|c| {
                GridCond::Spatial(
                    c.iter()
                        .take(window[0] * window[1])
                        .map(|v| v + offset)
                        .collect(),
                )
            })
            .collect(),
    };
    let sampling = Sampling {
        temperature: 1.0,
        top_k: Some(layout.config().n_embed.min(100)),
        top_p: None,
    };
    let mut images = Vec::new();
    for (i, cond) in conds.iter().enumerate() {
        let codes = synth
            .sample_codes(cond, window, 8, sampling, opts.config.seed + i as u64)
            .map_err(TrainError::from)?;
        images.extend(synth.decode(&codes, window));
    }
    let path = opts.run.out.join("samples.png");
    write_png(&tile(&images, 8), &path).map_err(|e| output(&path, e))
}
