//! Stage 1 as the run engine drives it: image shards read locally or streamed from dataloader
//! services, the trainer's step, validation L1 on a fixed batch, and at the end
//! `val_grid.png` (inputs beside reconstructions) and `model/` (the project's model format,
//! for `vqgan encode|decode|reconstruct|eval`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::Tensor;
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, ImageBatch, LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader,
};
use taming_model::checkpoint::native;
use taming_model::image_io::to_image;
use taming_model::quantize::QuantizeMode;

use super::config::{Objective, Stage1Config};
use super::report::{label_image, write_grid};
use super::trainer::{Stage1Trainer, StepReport};
use crate::engine::{self, Columns, Plan, RunError, Stage, Start, StepOutput, output};
use crate::learner::Group;
use crate::settings::RunSettings;

/// The columns of a stage-1 `metrics.csv`.
pub const COLUMNS: Columns = Columns {
    values: &[
        "total", "nll", "l1", "p_loss", "quant", "g_loss", "d_loss", "d_weight", "usage",
    ],
    rate: "images_per_s",
    val: "val_l1",
    plotted: &["l1", "nll"],
};

/// Validation images evaluated at every evaluation step.
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
        run: &RunSettings,
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

    fn validation(&self) -> Result<ImageBatch, RunError> {
        let shards = list_split(&self.data, "val")?;
        let cfg = self.loader_config(VAL_BATCH, false);
        ShardLoader::open(&shards, cfg, &LoaderState::default())?
            .next_in_epoch()?
            .ok_or_else(|| {
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
        let (trainer, state) = match start {
            Start::New => (
                Stage1Trainer::new(self.config.clone(), run.nodes, &run.device)?,
                LoaderState::default(),
            ),
            Start::Resume(dir) => {
                let (trainer, rank0) = Stage1Trainer::resume(&dir, run.nodes, &run.device)?;
                let own = engine::saved_position(run, trainer.step());
                let state = own.unwrap_or(match run.rank {
                    0 => rank0,
                    // Another world size, or a new rank: this epoch afresh.
                    _ => LoaderState {
                        epoch: rank0.epoch,
                        ..LoaderState::default()
                    },
                });
                (trainer, state)
            }
        };
        let loader = self.train_source(run, state)?;
        let val = self.validation()?;
        let val_x = trainer.input(&val)?;
        Ok(VqganStage {
            trainer,
            loader,
            val,
            val_x,
            plan: self,
        })
    }
}

/// A stage-1 run in progress.
pub struct VqganStage {
    trainer: Stage1Trainer,
    loader: Box<dyn BatchSource>,
    val: ImageBatch,
    val_x: Tensor<4>,
    plan: VqganPlan,
}

impl VqganStage {
    /// Micro-batches until the optimizers step; the report and the time spent waiting.
    fn next_report(mut self) -> Result<(Self, StepReport, Duration), RunError> {
        let mut waited = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let batch = tracing::info_span!("data_wait").in_scope(|| self.loader.next_batch())?;
            waited += asked.elapsed();
            let x = self.trainer.input(&batch)?;
            let cond = self.trainer.condition(&batch)?;
            let (trainer, report) = self.trainer.train_batch(x, cond)?;
            self.trainer = trainer;
            if let Some(report) = report {
                return Ok((self, report, waited));
            }
        }
    }
}

impl Stage for VqganStage {
    fn columns(&self) -> &'static Columns {
        &COLUMNS
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
        let (stage, r, data_wait) = self.next_report()?;
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

    fn evaluate(&self) -> Result<f64, RunError> {
        Ok(self.trainer.eval_l1(self.val_x.clone()))
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

    fn finish(&self, out: &Path) -> Result<(), RunError> {
        let model = self.trainer.model().valid();
        let x = self.val_x.clone().inner();
        let rec = model.forward(x.clone(), QuantizeMode::EVAL).reconstruction;
        let picture = |t: Tensor<4>| match self.trainer.objective() {
            Objective::Vqgan => to_image(t),
            Objective::Segmentation => label_image(t),
        };
        let pictures = |t: &Tensor<4>| -> Vec<_> {
            (0..self.val.shape[0])
                .map(|i| picture(t.clone().narrow(0, i, 1)))
                .collect()
        };
        let grid = out.join("val_grid.png");
        write_grid(&grid, &pictures(&x), &pictures(&rec)).map_err(|e| output(&grid, e))?;
        let model_dir = out.join("model");
        native::save_model(
            &model_dir,
            &self.plan.config.model,
            &model,
            &BTreeMap::new(),
            true,
        )
        .map_err(|e| output(&model_dir, e))
    }
}
