//! Stage 1 as the run engine drives it: image shards read locally or streamed from dataloader
//! services, the trainer's step, validation over the whole validation split (or the first
//! `val_images`): L1, PSNR, SSIM and codebook usage of clamped reconstructions, as `vqgan eval`
//! measures them; the validation grid (the first 16 inputs beside their reconstructions), and
//! at the end `model/` (the project's model format, for `vqgan encode|decode|reconstruct|eval`).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::Tensor;
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, ImageBatch, LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader,
};
use taming_import::inception::{WeightsCheck, load_fid_inception};
use taming_model::checkpoint::native;
use taming_model::fid::{StatsAccumulator, frechet_distance};
use taming_model::image_io::to_image;
use taming_model::inception::{FEATURES, FidInception, eight_bit};
use taming_model::metrics::Reconstructions;
use taming_model::quantize::QuantizeMode;

use super::config::{Objective, Stage1Config};
use super::report::{grid, label_image};
use super::trainer::{Stage1Trainer, StepReport};
use crate::engine::{self, Columns, Picture, Plan, RunError, Stage, Start, StepOutput, output};
use crate::learner::Group;
use crate::settings::{RunContext, RunSettings};

/// The training columns of a stage-1 `metrics.csv`.
pub const VALUES: &[&str] = &[
    "total",
    "nll",
    "l1",
    "p_loss",
    "quant",
    "g_loss",
    "d_loss",
    "d_weight",
    "usage",
    "perplexity",
    "skipped",
];

/// The columns of a stage-1 `metrics.csv`: the training values, then the validation metrics
/// (`val_l1`, `val_psnr`, `val_ssim`, `val_usage`; for the segmentation objective `val_l1` of
/// the label probabilities), named `val{N}_...` when only the first `N` images are evaluated.
pub fn columns(config: &Stage1Config) -> Columns {
    let prefix = match config.val_images {
        Some(n) => format!("val{n}_"),
        None => "val_".into(),
    };
    let names: &[&str] = match (config.objective, &config.eval.inception) {
        (Objective::Vqgan, None) => &["l1", "psnr", "ssim", "usage"],
        (Objective::Vqgan, Some(_)) => &["l1", "psnr", "ssim", "usage", "rfid"],
        (Objective::Segmentation, _) => &["l1"],
    };
    Columns {
        values: VALUES,
        rate: "images_per_s",
        val: names.iter().map(|n| format!("{prefix}{n}")).collect(),
        plotted: &["l1", "nll"],
    }
}

/// Validation images per batch, and in the validation grid.
const VAL_BATCH: usize = 16;

/// What a stage-1 run trains on.
pub struct VqganPlan {
    /// Training settings.
    pub config: Stage1Config,
    /// Directory or object-store prefix with `train-*.tar` and `val-*.tar` shards.
    pub data: String,
    /// Dataloader service instances to stream training batches from (none: read locally).
    pub dataloaders: Vec<String>,
}

impl VqganPlan {
    /// Training `config` on the shards of `data`, read locally.
    pub fn new(config: Stage1Config, data: String) -> Self {
        Self {
            config,
            data,
            dataloaders: Vec::new(),
        }
    }

    fn loader_config(&self, batch_size: usize, train: bool) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            preprocess: Preprocess {
                size: self.config.model.ddconfig.resolution,
                random_crop: train,
                flip: train && self.config.flip,
            },
            reader: ReaderConfig {
                shuffle_shards: train,
                seed: self.config.seed,
                ..ReaderConfig::default()
            },
            require_masks: self.config.needs_label_maps(),
        }
    }

    fn train_source(
        &self,
        run: &RunContext,
        state: LoaderState,
    ) -> Result<Box<dyn BatchSource>, RunError> {
        let shards = list_split(&self.data, "train")?;
        let mut cfg = self.loader_config(self.config.batch_size, true);
        cfg.reader.rank = run.rank;
        cfg.reader.world_size = run.world;
        let source: Box<dyn BatchSource> = if self.dataloaders.is_empty() {
            Box::new(ShardLoader::open(&shards, cfg, &state)?)
        } else {
            Box::new(RemoteLoader::new(
                self.dataloaders.clone(),
                shards,
                cfg,
                state,
            ))
        };
        Ok(run.ahead(source))
    }

    /// The validation split, from its first image.
    fn validation_loader(&self) -> Result<ShardLoader, RunError> {
        let shards = list_split(&self.data, "val")?;
        let cfg = self.loader_config(VAL_BATCH, false);
        Ok(ShardLoader::open(&shards, cfg, &LoaderState::default())?)
    }

    /// pytorch-fid's Inception on the run's device, when `eval.inception` names its weights
    /// (refused with the file named when they are not pytorch-fid's, unless `any_weights`).
    fn inception(&self, run: &RunContext) -> Result<Option<Box<FidInception>>, RunError> {
        let eval = &self.config.eval;
        let Some(path) = &eval.inception else {
            return Ok(None);
        };
        let check = WeightsCheck::accepting_any(eval.any_weights);
        let device = run.device.clone().inner();
        Ok(Some(Box::new(load_fid_inception(path, check, &device)?)))
    }

    /// The first validation batch (the grid's images).
    fn validation(&self) -> Result<ImageBatch, RunError> {
        self.validation_loader()?.next_in_epoch()?.ok_or_else(|| {
            output(
                Path::new(&self.data),
                "the validation shards hold no usable sample",
            )
        })
    }
}

impl Plan for VqganPlan {
    type Stage = VqganStage;

    fn check(&self) -> Result<(), RunError> {
        self.config.validate()?;
        list_split(&self.data, "train")?;
        list_split(&self.data, "val")?;
        Ok(())
    }

    fn open(self, run: &RunSettings, start: Start) -> Result<VqganStage, RunError> {
        let run = run.context();
        let (trainer, state) = match start {
            Start::New => (
                Stage1Trainer::new(self.config.clone(), run.nodes, &run.device)?,
                LoaderState::default(),
            ),
            Start::Resume(dir) => self.resume(&run, &dir)?,
        };
        let loader = self.train_source(&run, state)?;
        let val = self.validation()?;
        let val_x = trainer.input(&val)?;
        let inception = self.inception(&run)?;
        Ok(VqganStage {
            inception,
            trainer,
            loader,
            val,
            val_x,
            plan: self,
            run,
            recent_skips: VecDeque::new(),
        })
    }
}

impl VqganPlan {
    /// The trainer at the latest checkpoint of `ckpt_dir`, and this rank's data position.
    fn resume(
        &self,
        run: &RunContext,
        ckpt_dir: &Path,
    ) -> Result<(Stage1Trainer, LoaderState), RunError> {
        let (trainer, rank0) = Stage1Trainer::resume(ckpt_dir, run.nodes, &run.device)?;
        let own = engine::saved_position(run, trainer.step());
        let state = own.unwrap_or(match run.rank {
            0 => rank0,
            // Another world size, or a new rank: this epoch afresh.
            _ => LoaderState {
                epoch: rank0.epoch,
                ..LoaderState::default()
            },
        });
        Ok((trainer, state))
    }
}

/// A stage-1 run in progress.
pub struct VqganStage {
    trainer: Stage1Trainer,
    loader: Box<dyn BatchSource>,
    val: ImageBatch,
    val_x: Tensor<4>,
    plan: VqganPlan,
    run: RunContext,
    /// pytorch-fid's Inception, for rFID (`eval.inception`); boxed, as the stage moves by
    /// value.
    inception: Option<Box<FidInception>>,
    /// Steps skipped within the divergence window.
    recent_skips: VecDeque<u64>,
}

impl VqganStage {
    /// Micro-batches until the optimizers step; the report and the time spent waiting.
    fn next_report(mut self) -> Result<(Self, StepReport, Duration), RunError> {
        let mut waited = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let batch = tracing::info_span!("data_wait").in_scope(|| self.loader.next_batch())?;
            waited += asked.elapsed();
            let mut x = self.trainer.input(&batch)?;
            if crate::failpoint::nan_at(self.trainer.step() + 1) {
                x = x.mul_scalar(f32::NAN);
            }
            let cond = self.trainer.condition(&batch)?;
            let (trainer, report) = self.trainer.train_batch(x, cond)?;
            self.trainer = trainer;
            if let Some(report) = report {
                return Ok((self, report, waited));
            }
        }
    }
}

impl VqganStage {
    /// Counts a skipped step; past `divergence.max_skips` within its window, goes back to the
    /// latest checkpoint with the learning rate lowered. Every rank skips the same steps, so
    /// every rank rolls back alike.
    fn after_skip(mut self, step: u64) -> Result<Self, RunError> {
        let d = self.plan.config.divergence;
        self.recent_skips.push_back(step);
        while self
            .recent_skips
            .front()
            .is_some_and(|&s| s + d.window <= step)
        {
            self.recent_skips.pop_front();
        }
        if self.recent_skips.len() < d.max_skips {
            return Ok(self);
        }
        let ckpt_dir = self.run.out.join("checkpoints");
        if !ckpt_dir.join(crate::checkpoint::LATEST).exists() {
            return Err(output(
                &self.run.out,
                format!(
                    "{} steps with non-finite losses within {} steps and no checkpoint to go \
                     back to: lower the learning rate",
                    d.max_skips, d.window
                ),
            ));
        }
        // Each rollback lowers the rate in force (checkpoints hold it, never a higher one).
        let scale = self.trainer.lr_scale() * d.lr_factor;
        let (mut trainer, state) = self.plan.resume(&self.run, &ckpt_dir)?;
        trainer.set_lr_scale(scale);
        tracing::warn!(
            step,
            back_to = trainer.step(),
            lr = trainer.learning_rate(),
            "{} non-finite steps within {}: rolled back to the latest checkpoint",
            d.max_skips,
            d.window
        );
        let group = self.trainer.into_group();
        self.trainer = trainer.join_group(group)?;
        self.loader = self.plan.train_source(&self.run, state)?;
        self.recent_skips.clear();
        Ok(self)
    }
}

impl Stage for VqganStage {
    fn columns(&self) -> Columns {
        columns(&self.plan.config)
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
        let (mut stage, r, data_wait) = self.next_report()?;
        if r.skipped {
            stage = stage.after_skip(r.step)?;
        }
        let g = &r.generator;
        let values = vec![
            g.total,
            g.nll,
            g.l1,
            g.p_loss,
            g.quant,
            g.g_loss,
            r.d_loss.unwrap_or(0.0),
            g.d_weight,
            r.usage.unwrap_or(0.0),
            r.perplexity,
            r.skipped_total as f64,
        ];
        let config = &stage.plan.config;
        let samples = (config.batch_size * config.grad_accum) as f64;
        let out = StepOutput {
            values,
            samples,
            data_wait,
        };
        Ok((stage, out))
    }

    fn evaluate(&self) -> Result<Vec<f64>, RunError> {
        let _span = tracing::info_span!("evaluate").entered();
        let model = self.trainer.eval_model();
        let config = &self.plan.config;
        let mut loader = self.plan.validation_loader()?;
        let inception = self
            .inception
            .as_ref()
            .filter(|_| config.eval.fid_at(self.trainer.step()));
        let mut left = config.val_images.unwrap_or(usize::MAX);
        let mut measured = Reconstructions::new(config.model.n_embed);
        let mut seg_l1 = (0.0, 0usize);
        // Inception statistics of the images and of their reconstructions (rFID).
        let mut fid = [
            StatsAccumulator::new(FEATURES),
            StatsAccumulator::new(FEATURES),
        ];
        while left > 0
            && let Some(batch) = loader.next_in_epoch()?
        {
            crate::liveness::beat();
            let x = self.trainer.input(&batch)?.inner();
            let n = x.dims()[0].min(left);
            left -= n;
            let x = x.narrow(0, 0, n);
            let out = model.forward(x.clone(), QuantizeMode::EVAL);
            if config.objective == Objective::Segmentation {
                let probs = burn::tensor::activation::sigmoid(out.reconstruction);
                let l1 = (x - probs).abs().mean().into_scalar::<f32>() as f64;
                seg_l1 = (seg_l1.0 + l1 * n as f64, seg_l1.1 + n);
                continue;
            }
            let codes = out
                .quantized
                .indices
                .try_into_vec_as::<i64>()
                .expect("int codes");
            if let Some(net) = inception {
                let rec = out.reconstruction.clone();
                for (acc, images) in fid.iter_mut().zip([x.clone(), rec]) {
                    let features = net.features(eight_bit(images));
                    acc.add(&features.try_into_vec_as::<f32>().expect("f32 features"));
                }
            }
            measured.add(x, out.reconstruction, &codes);
        }
        if config.objective == Objective::Segmentation {
            return Ok(vec![seg_l1.0 / seg_l1.1.max(1) as f64]);
        }
        let r = measured.report();
        let mut values = vec![r.l1, r.psnr, r.ssim, r.usage];
        if inception.is_some() {
            let [images, recs] = fid;
            let rfid = frechet_distance(&images.finish()?, &recs.finish()?)?;
            values.push(rfid);
        } else if self.inception.is_some() {
            // Not measured at this step.
            values.push(f64::NAN);
        }
        Ok(values)
    }

    fn pictures(&self, _last: bool) -> Result<Vec<Picture>, RunError> {
        let model = self.trainer.eval_model();
        let x = self.val_x.clone().inner();
        let rec = model.forward(x.clone(), QuantizeMode::EVAL).reconstruction;
        let picture = |t: Tensor<4>| match self.trainer.objective() {
            Objective::Vqgan => to_image(t.clamp(-1.0, 1.0)),
            Objective::Segmentation => label_image(t),
        };
        let pictures = |t: &Tensor<4>| -> Vec<_> {
            (0..self.val.shape[0])
                .map(|i| picture(t.clone().narrow(0, i, 1)))
                .collect()
        };
        Ok(vec![("val_grid", grid(&pictures(&x), &pictures(&rec)))])
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::to_value(self.loader.state()).expect("a loader state serializes")
    }

    fn save_checkpoint(&self, ckpt_dir: &Path, keep: usize) -> Result<PathBuf, RunError> {
        Ok(self
            .trainer
            .save_checkpoint(ckpt_dir, self.loader.state(), keep)?)
    }

    fn skipped(&self) -> u64 {
        self.loader.skipped()
    }

    /// `model/`: the evaluated model (the weight average with `ema`); with `ema` also
    /// `model-raw/`, the trained weights themselves.
    fn finish(&self, out: &Path) -> Result<(), RunError> {
        let export = |dir: &str, model: &taming_model::Vqgan| {
            let model_dir = out.join(dir);
            native::save_model(
                &model_dir,
                &self.plan.config.model,
                model,
                &BTreeMap::new(),
                true,
            )
            .map_err(|e| output(&model_dir, e))
        };
        export("model", &self.trainer.eval_model())?;
        if self.trainer.has_ema() {
            export("model-raw", &self.trainer.model().valid())?;
        }
        Ok(())
    }
}
