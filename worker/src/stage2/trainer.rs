//! The stage-2 training step: cross-entropy of the image tokens, gradients averaged over the
//! data-parallel group, AdamW (betas 0.9, 0.95; decoupled weight decay on Linear weights
//! only) at the scheduled learning rate.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use taming_kernels::adam::{AdamSettings, adam_optimizer};
use taming_model::transformer::{Gpt, TokenLayout, TransformerConfig};

use super::config::Stage2Config;
use super::data::{CodePosition, CodeSample, windows};
use crate::checkpoint::{self, CheckpointError, HasStep};
use crate::engine::TrainError;
use crate::learner::{Accumulation, Ema, Group, Learner, materialize, step_seed};
use taming_dataloader::LoaderState;

/// Where the training data stands: a position in the code rows, or in the image shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Code Parquet position.
    pub codes: Option<CodePosition>,
    /// Image-shard position (codes encoded on the fly).
    pub images: Option<LoaderState>,
}

/// The small part of a stage-2 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage2State {
    /// Optimizer steps taken.
    pub step: u64,
    /// Total steps of the run (the schedule's length).
    pub total_steps: u64,
    /// Where the data stands.
    pub data: DataPosition,
}

impl HasStep for Stage2State {
    fn step(&self) -> u64 {
        self.step
    }
}

/// A checkpoint's config: the recipe and the model it built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage2CheckpointConfig {
    /// The training recipe.
    pub train: Stage2Config,
    /// The transformer.
    pub model: TransformerConfig,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Step number after this step.
    pub step: u64,
    /// Mean cross-entropy of the image tokens (last micro-batch).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Stage-2 trainer state: the GPT with its optimizer, the token layout, the step. Held and
/// stepped by value.
pub struct Stage2Trainer {
    gpt: Learner<Gpt>,
    accumulation: Accumulation,
    layout: TokenLayout,
    config: Stage2Config,
    nodes: usize,
    total_steps: u64,
    step: u64,
    device: Device,
    group: Group,
    /// The GPT's weight average (`ema` configured).
    ema: Option<Box<Ema<Gpt>>>,
}

impl Stage2Trainer {
    /// A fresh run of `total_steps` on `device` (an autodiff device).
    pub fn new(
        config: Stage2Config,
        model: TransformerConfig,
        nodes: usize,
        total_steps: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let layout = TokenLayout::new(model)?;
        device.seed(config.seed);
        let gpt = Gpt::new(&layout.config().gpt, device);
        materialize(&gpt);
        let settings = AdamSettings {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
        };
        let adam = adam_optimizer(settings);
        let ema = config.ema.map(|c| Box::new(Ema::new(c, &gpt)));
        Ok(Self {
            ema,
            gpt: Learner::new(gpt, adam).with_clip(config.grad_clip),
            accumulation: Accumulation::new(config.grad_accum),
            layout,
            config,
            nodes,
            total_steps,
            step: 0,
            device: device.clone(),
            group: Group::default(),
        })
    }

    /// Joins a data-parallel group: the GPT is replaced by rank 0's and gradients are
    /// averaged before every optimizer step.
    pub fn join_group(mut self, mut group: Group) -> Result<Self, TrainError> {
        self.gpt = self.gpt.synced(&mut group)?;
        self.group = group;
        Ok(self)
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Time spent averaging gradients.
    pub fn comm_time(&self) -> std::time::Duration {
        self.group.comm_time()
    }

    /// The GPT being trained.
    pub fn gpt(&self) -> &Gpt {
        &self.gpt.module
    }

    /// The GPT that is evaluated, sampled and exported, on the plain device: the weight
    /// average when `ema` is configured, otherwise the weights.
    pub fn eval_gpt(&self) -> Gpt {
        match &self.ema {
            Some(ema) => ema.average.clone(),
            None => self.gpt.module.valid(),
        }
    }

    /// Whether [`Self::eval_gpt`] is a weight average.
    pub fn has_ema(&self) -> bool {
        self.ema.is_some()
    }

    /// The token layout (model config and order).
    pub fn layout(&self) -> &TokenLayout {
        &self.layout
    }

    /// The learning rate of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.config
            .learning_rate(self.nodes, self.step, self.total_steps)
    }

    /// One micro-batch; every `grad_accum` micro-batches the optimizer steps and a report is
    /// returned.
    pub fn train_batch(
        mut self,
        batch: &[CodeSample],
    ) -> Result<(Self, Option<StepReport>), TrainError> {
        let seed = step_seed(self.config.seed, self.step) ^ self.accumulation.counted() as u64;
        self.device.seed(seed);
        let mut rng = StdRng::seed_from_u64(seed);
        let (images, conds) = windows(&self.layout, batch, &mut rng)?;
        let inputs = self
            .layout
            .train_batch(&images, &conds, &mut rng, &self.device);
        let loss = self.layout.loss(&self.gpt.module, inputs);
        // The mean over the step's micro-batches, as a larger batch's.
        let scaled = loss.clone().mul_scalar(1.0 / self.config.grad_accum as f64);
        let grads = GradientsParams::from_grads(scaled.backward(), &self.gpt.module);
        self.gpt.accumulate(grads);
        let completes = self.accumulation.count();
        if completes {
            // The mean runs while the loss is read and the weights decay.
            self.gpt.start_mean(&mut self.group);
        }
        let value = loss.into_scalar::<f32>() as f64;
        if !completes {
            return Ok((self, None));
        }
        let lr = self.learning_rate();
        let mut gpt = self.gpt;
        gpt.module = gpt
            .module
            .scale_linear_weights(1.0 - lr * self.config.weight_decay);
        self.gpt = gpt.step(lr, &mut self.group)?;
        self.step += 1;
        self.ema = self
            .ema
            .map(|e| Box::new(e.update(&self.gpt.module, self.step)));
        let report = StepReport {
            step: self.step,
            loss: value,
            lr,
        };
        Ok((self, Some(report)))
    }

    /// Mean cross-entropy of `batch` (first window of each grid, no dropout, no gradients).
    pub fn eval_loss(&self, batch: &[CodeSample]) -> Result<f64, TrainError> {
        let gpt = self.eval_gpt();
        let inner = self.device.clone().inner();
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let (images, conds) = windows(&self.layout, batch, &mut rng)?;
        let mut exact = self.layout.clone();
        exact.disable_token_dropout();
        let inputs = exact.train_batch(&images, &conds, &mut rng, &inner);
        Ok(exact.loss(&gpt, inputs).into_scalar::<f32>() as f64)
    }

    /// Writes a checkpoint of this step (keeping the newest `keep`).
    pub fn save_checkpoint(
        &self,
        run: &Path,
        data: DataPosition,
        keep: usize,
    ) -> Result<PathBuf, CheckpointError> {
        let config = Stage2CheckpointConfig {
            train: self.config.clone(),
            model: self.layout.config().clone(),
        };
        let state = Stage2State {
            step: self.step,
            total_steps: self.total_steps,
            data,
        };
        checkpoint::write(run, &config, &state, keep, |dir| {
            if let Some(ema) = &self.ema {
                ema.save(dir, "gpt_ema")?;
            }
            self.gpt.save(dir, "gpt", "opt")
        })
    }

    /// Continues the run in `run` from its latest checkpoint towards `total_steps` (the
    /// schedule's length); returns the trainer and the data position.
    pub fn resume(
        run: &Path,
        nodes: usize,
        total_steps: u64,
        device: &Device,
    ) -> Result<(Self, DataPosition), TrainError> {
        let dir = checkpoint::latest(run)?;
        let (config, state): (Stage2CheckpointConfig, Stage2State) = checkpoint::read_meta(&dir)?;
        let mut trainer = Self::new(config.train, config.model, nodes, total_steps, device)?;
        trainer.gpt = trainer.gpt.load(&dir, "gpt", "opt")?;
        trainer.ema = match trainer.ema {
            Some(ema) => Some(Box::new(ema.load(&dir, "gpt_ema")?)),
            None => None,
        };
        trainer.step = state.step;
        Ok((trainer, state.data))
    }
}
