//! Stage 2 as the run engine drives it: the data (code Parquet, or images encoded on the fly
//! by the frozen VQGAN), the trainer's step, validation cross-entropy, and at the end the
//! samples (decoded, one row per condition) and `model/` (the transformer directory for
//! `vqgan sample`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::Device;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader,
};
use taming_model::checkpoint::native;
use taming_model::image_io::tile;
use taming_model::synthesis::{SynthCond, Synthesizer};
use taming_model::transformer::{Conditioning, Gpt, GridCond, Sampling, TransformerConfig};
use taming_model::{Vqgan, VqganConfig};

use super::config::Stage2Config;
use super::data::{CodeSample, CodeSampler, check_samples, encode_batch, read_code_set};
use super::trainer::{DataPosition, Stage2Trainer, StepReport};
use crate::engine::{self, Columns, Picture, Plan, RunError, Stage, Start, StepOutput, output};
use crate::learner::Group;
use crate::settings::RunSettings;

/// The columns of a stage-2 `metrics.csv`: training cross-entropy and learning rate, tokens
/// per second, validation cross-entropy.
pub fn columns() -> Columns {
    Columns {
        values: &["loss", "lr"],
        rate: "tokens_per_s",
        val: vec!["val_loss".into()],
        plotted: &["loss"],
    }
}

/// What the transformer is conditioned on: the cluster protocol's type, so that a job's
/// conditioning means one thing from the command line to the trainer.
pub use taming_proto::job::Conditioning as CondKind;

/// What a stage-2 run trains on.
pub struct TransformerPlan {
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
}

impl TransformerPlan {
    /// Training `config` over the codes of the frozen `vqgan` (model directory), conditioned
    /// on `cond`, with the image shards of `data` encoded on the fly.
    pub fn new(config: Stage2Config, vqgan: PathBuf, cond: CondKind, data: String) -> Self {
        Self {
            config,
            vqgan,
            cond,
            cond_vqgan: None,
            codes: None,
            val_codes: None,
            data,
        }
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

fn load_models(
    opts: &TransformerPlan,
    run: &RunSettings,
    device: &Device,
) -> Result<Models, RunError> {
    let vqgan = native::load_model(&opts.vqgan, device)?;
    let cond_vqgan = match (&opts.cond_vqgan, opts.cond) {
        (Some(dir), CondKind::Segmentation) => Some(native::load_model(dir, device)?),
        (None, CondKind::Segmentation) => {
            return Err(output(
                &run.out,
                "--cond segmentation needs --cond-vqgan (the VQGAN that encoded the maps)",
            ));
        }
        _ => None,
    };
    Ok(Models { vqgan, cond_vqgan })
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

/// What opening a stage-2 run works with: the plan, the run's settings, the frozen models and
/// the (non-autodiff) device they run on.
struct Setup<'a> {
    opts: &'a TransformerPlan,
    run: &'a RunSettings,
    models: Models,
    inner: Device,
}

/// One of the image loaders of a run without code Parquet.
struct ImageSplit<'a> {
    split: &'a str,
    batch: usize,
    train: bool,
}

impl Setup<'_> {
    fn image_loader(
        &self,
        which: ImageSplit,
        state: &LoaderState,
    ) -> Result<ShardLoader, RunError> {
        let (opts, run) = (self.opts, self.run);
        let ImageSplit {
            split,
            batch,
            train,
        } = which;
        let size = self.models.vqgan.0.ddconfig.resolution;
        let shards = list_split(&opts.data, split)?;
        let mut reader = ReaderConfig {
            shuffle_shards: train,
            seed: opts.config.seed,
            ..ReaderConfig::default()
        };
        if train {
            reader.rank = run.rank;
            reader.world_size = run.world;
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

    fn read_data(&self) -> Result<Data, RunError> {
        let (opts, run, models) = (self.opts, self.run, &self.models);
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
                &run.out,
                "--cond segmentation trains from code Parquet (dataloader precompute-codes \
             --cond-vqgan): give --codes",
            ));
        }
        let val_split = ImageSplit {
            split: "val",
            batch: 64,
            train: false,
        };
        let mut val_loader = self.image_loader(val_split, &LoaderState::default())?;
        let val = encode_batch(&models.vqgan.1, &val_loader.next_batch()?, &self.inner);
        Ok(Data {
            rows: None,
            val,
            source: opts.data.clone(),
            val_source: opts.data.clone(),
        })
    }

    /// The transformer a fresh run builds: the VQGAN's codebook, the window (configured, else
    /// the data's grid) and the conditioning (classes configured, else found in the code rows).
    fn model_config(&self, data: &Data) -> Result<TransformerConfig, RunError> {
        let (opts, run, models) = (self.opts, self.run, &self.models);
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
                            &run.out,
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
        model.validate()?;
        Ok(model)
    }

    fn open_batches(&self, data: &mut Data, position: &DataPosition) -> Result<Batches, RunError> {
        let (opts, run, models) = (self.opts, self.run, &self.models);
        if let Some(rows) = data.rows.take() {
            let pos = position.codes.clone().unwrap_or_default();
            return Ok(Batches::Codes(CodeSampler::new(
                rows,
                run.rank,
                run.world,
                opts.config.seed,
                pos,
            )));
        }
        let state = position.images.clone().unwrap_or_default();
        let train_split = ImageSplit {
            split: "train",
            batch: opts.config.batch_size,
            train: true,
        };
        let loader = self.image_loader(train_split, &state)?;
        Ok(Batches::Images(Box::new((
            run.ahead(Box::new(loader)),
            models.vqgan.1.clone(),
            self.inner.clone(),
        ))))
    }
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

impl Plan for TransformerPlan {
    type Stage = TransformerStage;

    fn check(&self) -> Result<(), RunError> {
        Ok(self.config.validate()?)
    }

    fn open(self, run: &RunSettings, start: Start) -> Result<TransformerStage, RunError> {
        let inner = run.device.clone().inner();
        let models = load_models(&self, run, &inner)?;
        let setup = Setup {
            opts: &self,
            run,
            models,
            inner,
        };
        let mut data = setup.read_data()?;
        let (trainer, position) = match start {
            Start::New => {
                let model = setup.model_config(&data)?;
                let trainer = Stage2Trainer::new(
                    self.config.clone(),
                    model,
                    run.nodes,
                    run.steps,
                    &run.device,
                )?;
                (trainer, DataPosition::default())
            }
            Start::Resume(dir) => {
                let (trainer, rank0) =
                    Stage2Trainer::resume(&dir, run.nodes, run.steps, &run.device)?;
                let own = engine::saved_position(&run.context(), trainer.step());
                (trainer, own.unwrap_or(rank0))
            }
        };
        let model = trainer.layout().config().clone();
        if let Some(rows) = &data.rows {
            check_samples(rows, &model, &data.source)?;
        }
        check_samples(&data.val, &model, &data.val_source)?;
        let batches = setup.open_batches(&mut data, &position)?;
        let Setup { models, inner, .. } = setup;
        Ok(TransformerStage {
            trainer,
            batches,
            data,
            models,
            inner,
            plan: self,
        })
    }
}

/// A stage-2 run in progress.
pub struct TransformerStage {
    trainer: Stage2Trainer,
    batches: Batches,
    data: Data,
    models: Models,
    inner: Device,
    plan: TransformerPlan,
}

impl TransformerStage {
    /// Micro-batches until the optimizer steps; the report and the time spent waiting.
    fn next_report(mut self) -> Result<(Self, StepReport, Duration), RunError> {
        let model = self.trainer.layout().config().clone();
        let batch_size = self.plan.config.batch_size;
        let mut waited = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let batch =
                tracing::info_span!("data_wait").in_scope(|| self.batches.next(batch_size))?;
            waited += asked.elapsed();
            if let Batches::Images(..) = self.batches {
                check_samples(&batch, &model, &self.data.source)?;
            }
            let (trainer, report) = self.trainer.train_batch(&batch)?;
            self.trainer = trainer;
            if let Some(report) = report {
                return Ok((self, report, waited));
            }
        }
    }
}

impl Stage for TransformerStage {
    fn columns(&self) -> Columns {
        columns()
    }

    fn step(&self) -> u64 {
        self.trainer.step()
    }

    fn join(mut self, group: Group) -> Result<Self, RunError> {
        self.trainer = self.trainer.join_group(group)?;
        Ok(self)
    }

    fn comm_time(&self) -> Duration {
        self.trainer.comm_time()
    }

    fn train_step(self) -> Result<(Self, StepOutput), RunError> {
        let (stage, report, data_wait) = self.next_report()?;
        let config = &stage.plan.config;
        let tokens =
            config.batch_size * config.grad_accum * stage.trainer.layout().config().window_tokens();
        let out = StepOutput {
            values: vec![report.loss, report.lr],
            samples: tokens as f64,
            data_wait,
        };
        Ok((stage, out))
    }

    fn evaluate(&self) -> Result<Vec<f64>, RunError> {
        Ok(vec![self.trainer.eval_loss(&self.data.val)?])
    }

    /// Samples only at the end (sampling every class's rows takes longer than an
    /// evaluation).
    fn pictures(&self, last: bool) -> Result<Vec<Picture>, RunError> {
        if !last {
            return Ok(Vec::new());
        }
        let gpt = self.trainer.eval_gpt();
        let synth = Synthesizer {
            gpt: &gpt,
            layout: self.trainer.layout(),
            vqgan: (&self.models.vqgan.0, &self.models.vqgan.1),
            cond_vqgan: self.models.cond_vqgan.as_ref().map(|(c, m)| (c, m)),
            device: self.inner.clone(),
        };
        let images = samples(&synth, &self.data.val, self.plan.config.seed)?;
        Ok(vec![("samples", tile(&images, 8))])
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::to_value(self.batches.position()).expect("a data position serializes")
    }

    fn save_checkpoint(&self, ckpt_dir: &Path, keep: usize) -> Result<PathBuf, RunError> {
        Ok(self
            .trainer
            .save_checkpoint(ckpt_dir, self.batches.position(), keep)?)
    }

    /// `model/`: the evaluated GPT (the weight average with `ema`); with `ema` also
    /// `model-raw/`, the trained weights themselves.
    fn finish(&self, out: &Path) -> Result<(), RunError> {
        let export = |dir: &str, gpt: &Gpt| {
            let model_dir = out.join(dir);
            native::save_transformer(&model_dir, self.trainer.layout().config(), gpt, true)
                .map_err(|e| output(&model_dir, e))
        };
        export("model", &self.trainer.eval_gpt())?;
        if self.trainer.has_ema() {
            export("model-raw", &self.trainer.gpt().valid())?;
        }
        Ok(())
    }
}
/// A grid of samples: one row per condition (up to 10 classes, the first validation maps,
/// or unconditional samples), 8 samples each.
fn samples(
    synth: &Synthesizer,
    val: &[CodeSample],
    seed: u64,
) -> Result<Vec<image::RgbImage>, RunError> {
    let layout = synth.layout;
    let window = layout.config().window;
    let offset = layout.config().cond_offset() as i64;
    let conds: Vec<GridCond> = match &layout.config().cond {
        Conditioning::None { .. } => vec![synth.grid_cond(&SynthCond::None, window)?],
        Conditioning::Class { n_classes } => (0..(*n_classes).min(10) as i64)
            .map(|c| synth.grid_cond(&SynthCond::Class(c), window))
            .collect::<Result<_, _>>()?,
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
        crate::liveness::beat();
        let codes = synth.sample_codes(cond, window, 8, sampling, seed + i as u64)?;
        images.extend(synth.decode(&codes, window));
    }
    Ok(images)
}
