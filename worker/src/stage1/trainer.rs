//! The stage-1 training step: ONE autoencoder forward per step, the generator update from
//! the reference's objective (see `taming_model::loss::vqperceptual`), then the discriminator
//! update on the same, detached reconstruction (the reference recomputes it).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use taming_dataloader::{ImageBatch, LoaderState};
use taming_kernels::adam::{AdamSettings, adam_optimizer};
use taming_model::Vqgan;
use taming_model::config::QuantizerConfig;
use taming_model::error::ModelError;
use taming_model::loss::{
    GeneratorInputs, GeneratorLog, LastLayer, LeCamAnchors, Lpips, NLayerDiscriminator, VqLoss,
    bce_with_logits,
};
use taming_model::quantize::{
    CodebookMaintainer, GroupMean, MaintainerState, QuantizeMode, Quantizer, UsageWindow,
    perplexity,
};

use super::config::{Objective, Stage1Config};
use crate::checkpoint::{self, CheckpointError, HasStep};
use crate::engine::TrainError;
use crate::learner::{Accumulation, Ema, ForwardGroup, Group, Learner, materialize, step_seed};

/// The small, human-readable part of a stage-1 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage1State {
    /// Optimizer steps taken.
    pub step: u64,
    /// Where the training data reader stands.
    pub loader: LoaderState,
    /// Codebook maintenance (vector quantizers).
    pub maintainer: Option<MaintainerState>,
    /// The LeCam regularizer's running means.
    #[serde(default)]
    pub lecam: LeCamAnchors,
    /// Steps skipped so far (non-finite losses).
    #[serde(default)]
    pub skipped: u64,
    /// Factor on the configured learning rate (lowered by each rollback after divergence).
    #[serde(default = "one")]
    pub lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl HasStep for Stage1State {
    fn step(&self) -> u64 {
        self.step
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Step number after this step.
    pub step: u64,
    /// Generator-side losses (of the last micro-batch).
    pub generator: GeneratorLog,
    /// Discriminator loss, when the discriminator trained.
    pub d_loss: Option<f64>,
    /// Codebook usage over the recent-token window.
    pub usage: Option<f64>,
    /// Per-batch perplexity of the codes.
    pub perplexity: f64,
    /// Codes restarted from the batch by dead-code restart in this step.
    pub restarted: usize,
    /// Whether the step was skipped (a loss was not finite on some rank): no parameter
    /// changed.
    pub skipped: bool,
    /// Steps skipped since the run began.
    pub skipped_total: u64,
}

/// Stage-1 trainer state: the autoencoder and the discriminator with their optimizers, the
/// loss, codebook maintenance, the step. Held and stepped by value.
pub struct Stage1Trainer {
    ae: Learner<Vqgan>,
    disc: Learner<NLayerDiscriminator>,
    accumulation: Accumulation,
    loss: VqLoss,
    maintainer: Option<CodebookMaintainer>,
    config: Stage1Config,
    lr: f64,
    lr_scale: f64,
    step: u64,
    device: Device,
    group: Group,
    lecam: LeCamAnchors,
    /// The step's logits means (real, fake), for the LeCam anchors.
    logits: Option<(f64, f64)>,
    /// Whether a micro-batch of the current step had a non-finite loss.
    nonfinite: bool,
    skipped: u64,
    /// The autoencoder's weight average (`ema` configured); boxed, as the trainer moves by
    /// value.
    ema: Option<Box<Ema<Vqgan>>>,
    /// Codes used by recent tokens, for quantizers without codebook maintenance (which
    /// keeps its own).
    usage: UsageWindow,
}

/// Tokens over which quantizers without codebook maintenance report usage (the maintained
/// ones use their config's `usage_window`, 65,536 by default).
const USAGE_WINDOW: usize = 65_536;

/// The reference's Adam (betas 0.5, 0.9), one pass per parameter on the CPU backend.
fn adam() -> ModuleOptimizer {
    let settings = AdamSettings {
        beta_1: 0.5,
        beta_2: 0.9,
        epsilon: 1e-8,
    };
    adam_optimizer(settings)
}

impl Stage1Trainer {
    /// A fresh run on `device` (an autodiff device) for `nodes` nodes.
    pub fn new(config: Stage1Config, nodes: usize, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let lpips = match (&config.loss.lpips, config.loss.perceptual_weight > 0.0) {
            (Some(cfg), true) => Some(taming_import::load_lpips(cfg, device)?),
            _ => None,
        };
        Self::with_lpips(config, nodes, device, lpips)
    }

    /// A fresh run with a given LPIPS network (`None`: no perceptual term), for benchmarks
    /// and callers that build LPIPS themselves. The config's `lpips` paths are not read.
    pub fn with_lpips(
        config: Stage1Config,
        nodes: usize,
        device: &Device,
        lpips: Option<Lpips>,
    ) -> Result<Self, ModelError> {
        config.model.validate()?;
        device.seed(config.seed);
        let model = Vqgan::new(&config.model, device)?;
        let disc = NLayerDiscriminator::new(&config.loss.discriminator, device);
        // Parameters initialize lazily; draw them now, while the seed above holds.
        materialize(&model);
        materialize(&disc);
        let maintainer = match &config.model.quantizer {
            QuantizerConfig::Vector(vq) => Some(CodebookMaintainer::new(
                vq,
                config.model.n_embed,
                config.seed,
            )),
            _ => None,
        };
        let ema = config.ema.map(|c| Box::new(Ema::new(c, &model)));
        let usage = UsageWindow::new(config.model.n_embed, USAGE_WINDOW);
        Ok(Self {
            ema,
            usage,
            ae: Learner::new(model, adam()).with_clip(config.grad_clip),
            disc: Learner::new(disc, adam()).with_clip(config.grad_clip),
            accumulation: Accumulation::new(config.grad_accum),
            loss: VqLoss::new(config.loss.clone(), lpips),
            maintainer,
            lr: config.learning_rate(nodes),
            lr_scale: 1.0,
            config,
            step: 0,
            device: device.clone(),
            group: Group::default(),
            lecam: LeCamAnchors::default(),
            logits: None,
            nonfinite: false,
            skipped: 0,
        })
    }

    /// Joins a data-parallel group: the model and discriminator are replaced by rank 0's, and
    /// from now on gradients are averaged over the group before every optimizer step and the
    /// codebook (which each rank's maintenance changes) is copied from rank 0 after it.
    pub fn join_group(mut self, mut group: Group) -> Result<Self, TrainError> {
        self.ae = self.ae.synced(&mut group)?;
        self.disc = self.disc.synced(&mut group)?;
        self.group = group;
        Ok(self)
    }

    /// The data-parallel group, leaving the trainer (to hand to another).
    pub fn into_group(self) -> Group {
        self.group
    }

    /// Time spent in collectives (gradient means, codebook broadcasts) so far.
    pub fn comm_time(&self) -> std::time::Duration {
        self.group.comm_time()
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The learning rate in force.
    pub fn learning_rate(&self) -> f64 {
        self.lr * self.lr_scale
    }

    /// Scales the configured learning rate by `scale` from now on (kept in checkpoints).
    pub fn set_lr_scale(&mut self, scale: f64) {
        self.lr_scale = scale;
    }

    /// The factor on the configured learning rate.
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// The autoencoder being trained.
    pub fn model(&self) -> &Vqgan {
        &self.ae.module
    }

    /// The autoencoder that is evaluated and exported, on the plain device: the weight
    /// average when `ema` is configured, otherwise the weights.
    pub fn eval_model(&self) -> Vqgan {
        match &self.ema {
            Some(ema) => ema.average.clone(),
            None => self.ae.module.valid(),
        }
    }

    /// Whether [`Self::eval_model`] is a weight average.
    pub fn has_ema(&self) -> bool {
        self.ema.is_some()
    }

    /// The discriminator being trained.
    pub fn discriminator(&self) -> &NLayerDiscriminator {
        &self.disc.module
    }

    /// A batch as a tensor on the trainer's device.
    pub fn to_tensor(&self, batch: &ImageBatch) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(batch.images.clone(), batch.shape),
            &self.device,
        )
    }

    /// The network input of a batch: the images, or for the segmentation objective the
    /// one-hot `[b, labels, h, w]` of its label maps (errors name the sample).
    pub fn input(&self, batch: &ImageBatch) -> Result<Tensor<4>, ModelError> {
        if self.config.objective == Objective::Vqgan {
            return Ok(self.to_tensor(batch));
        }
        self.one_hot_maps(
            batch,
            self.config.model.ddconfig.in_channels,
            "the segmentation objective",
        )
    }

    /// The discriminator's condition for a batch with `loss.disc_conditional`: the one-hot
    /// label maps with `discriminator.in_channels - out_ch` labels; `None` otherwise.
    pub fn condition(&self, batch: &ImageBatch) -> Result<Option<Tensor<4>>, ModelError> {
        if !self.config.loss.disc_conditional {
            return Ok(None);
        }
        let labels = self.config.loss.discriminator.in_channels - self.config.model.ddconfig.out_ch;
        self.one_hot_maps(batch, labels, "the conditional discriminator")
            .map(Some)
    }

    fn one_hot_maps(
        &self,
        batch: &ImageBatch,
        classes: usize,
        needed_by: &str,
    ) -> Result<Tensor<4>, ModelError> {
        let [b, _, h, w] = batch.shape;
        let masks = batch.masks.as_ref().ok_or_else(|| {
            let key = batch.keys.first().cloned().unwrap_or_default();
            ModelError::file(
                batch.sources.first().cloned().unwrap_or_default(),
                format!(
                    "sample `{key}` has no label map (.seg.png): {needed_by} needs one per sample"
                ),
            )
        })?;
        let maps: Result<Vec<Tensor<4>>, ModelError> = (0..b)
            .map(|i| {
                let source = format!("{} sample `{}`", batch.sources[i], batch.keys[i]);
                let labels = &masks[i * h * w..(i + 1) * h * w];
                taming_model::image_io::one_hot(labels, classes, [h, w], &source, &self.device)
            })
            .collect();
        Ok(Tensor::cat(maps?, 0))
    }

    /// One micro-batch of `x`, with the discriminator's condition ([`Self::condition`]) that
    /// a `disc_conditional` config needs; every `grad_accum` micro-batches the optimizers step
    /// and a report is returned.
    pub fn train_batch(
        mut self,
        x: Tensor<4>,
        cond: Option<Tensor<4>>,
    ) -> Result<(Self, Option<StepReport>), TrainError> {
        self.seed_micro_batch();
        let temperature = self.temperature();
        let group = ForwardGroup::lend(&mut self.group);
        let mode = QuantizeMode {
            training: true,
            temperature,
            group: group.as_ref().map(|g| g as &dyn GroupMean),
        };
        let out = self.ae.module.forward(x.clone(), mode);
        let finite = finite_output(&out);
        let log = if !finite {
            // Nothing reaches the losses: the discriminator's BatchNorm statistics would keep
            // the NaN.
            GeneratorLog {
                total: f64::NAN,
                ..GeneratorLog::default()
            }
        } else {
            match self.config.objective {
                Objective::Vqgan => self.generator_backward(x.clone(), &out, cond.as_ref()),
                Objective::Segmentation => self.segmentation_loss(x.clone(), &out),
            }
        };
        let completes = self.accumulation.count();
        if completes {
            // The generator's mean runs while the discriminator computes. Every rank starts
            // it at the same micro-batch, finite or not, so that the group's collectives stay
            // in the same order everywhere.
            self.ae.start_mean(&mut self.group);
        }
        let d_loss = match self.config.objective {
            Objective::Vqgan if finite => self.discriminator_backward(x, &out, cond.as_ref()),
            _ => None,
        };
        self.nonfinite |= !log.total.is_finite() || d_loss.is_some_and(|d| !d.is_finite());
        if !completes {
            return Ok((self, None));
        }
        if self.group.any(std::mem::take(&mut self.nonfinite))? {
            return Ok(self.skip_step(log, d_loss));
        }
        // Codebook maintenance and perplexity see the step's last micro-batch.
        let (flat, host) = flat_codes(out.quantized.indices);
        let lr = self.learning_rate();
        self.ae = self.ae.step(lr, &mut self.group)?;
        if d_loss.is_some() {
            self.disc = self.disc.step(lr, &mut self.group)?;
            self.update_lecam()?;
        }
        let model = self.ae.module;
        let (model, usage, restarted) = maintain(
            self.maintainer.as_mut(),
            model,
            out.quantized.lookup_latents,
            flat,
        );
        self.ae.module = if self.maintainer.is_some() {
            sync_codebook(&mut self.group, model)?
        } else {
            model
        };
        self.step += 1;
        self.ema = self
            .ema
            .map(|e| Box::new(e.update(&self.ae.module, self.step)));
        let usage = usage.unwrap_or_else(|| {
            self.usage.observe(&host);
            self.usage.usage()
        });
        let report = StepReport {
            step: self.step,
            generator: log,
            d_loss,
            usage: Some(usage),
            perplexity: perplexity(&host, self.config.model.n_embed),
            restarted,
            skipped: false,
            skipped_total: self.skipped,
        };
        Ok((self, Some(report)))
    }

    /// A step whose loss was not finite somewhere: its gradients are dropped, no parameter
    /// or codebook changes, and it is counted.
    fn skip_step(mut self, log: GeneratorLog, d_loss: Option<f64>) -> (Self, Option<StepReport>) {
        self.ae.discard();
        self.disc.discard();
        self.logits = None;
        self.step += 1;
        self.skipped += 1;
        tracing::warn!(
            step = self.step,
            "a loss is not finite: the step is skipped"
        );
        let report = StepReport {
            step: self.step,
            generator: log,
            d_loss,
            usage: Some(
                self.maintainer
                    .as_ref()
                    .map_or(self.usage.usage(), |m| m.usage()),
            ),
            perplexity: f64::NAN,
            restarted: 0,
            skipped: true,
            skipped_total: self.skipped,
        };
        (self, Some(report))
    }

    /// Moves the LeCam anchors towards the step's mean logits, averaged over the group so
    /// that every rank keeps the same anchors.
    fn update_lecam(&mut self) -> Result<(), TrainError> {
        let Some((real, fake)) = self.logits.take() else {
            return Ok(());
        };
        if self.config.loss.lecam_weight <= 0.0 {
            return Ok(());
        }
        let mut means = [real as f32, fake as f32];
        self.group.mean_values(&mut means)?;
        let means = (f64::from(means[0]), f64::from(means[1]));
        self.lecam.update(means, self.config.loss.lecam_decay);
        Ok(())
    }

    /// The reference's objective, generator side: gradients from L1 + LPIPS + the adaptive
    /// GAN term.
    fn generator_backward(
        &mut self,
        x: Tensor<4>,
        out: &taming_model::vqgan::VqganOutput,
        cond: Option<&Tensor<4>>,
    ) -> GeneratorLog {
        let last = LastLayer {
            input: out.last_input.clone(),
            weight: self.ae.module.last_layer_weight(),
        };
        let inputs = GeneratorInputs {
            x,
            rec: out.reconstruction.clone(),
            quant: out.quantized.loss.clone(),
            last: &last,
            cond,
        };
        let generator = self.loss.generator(&self.disc.module, inputs, self.step);
        let surrogate = generator.surrogate.mul_scalar(self.micro_batch_share());
        let grads = GradientsParams::from_grads(surrogate.backward(), &self.ae.module);
        self.ae.accumulate(grads);
        generator.log
    }

    /// The discriminator's gradients on the detached reconstruction, once it started; its
    /// loss.
    fn discriminator_backward(
        &mut self,
        x: Tensor<4>,
        out: &taming_model::vqgan::VqganOutput,
        cond: Option<&Tensor<4>>,
    ) -> Option<f64> {
        let d = self.loss.discriminator(
            &self.disc.module,
            (x, out.reconstruction.clone().detach()),
            self.step,
            cond,
            self.lecam,
        );
        d.map(|(loss, real, fake)| {
            self.logits = Some((real, fake));
            let value = loss.clone().into_scalar::<f32>() as f64;
            let loss = loss.mul_scalar(self.micro_batch_share());
            let grads = GradientsParams::from_grads(loss.backward(), &self.disc.module);
            self.disc.accumulate(grads);
            value
        })
    }

    /// The segmentation objective: BCE on the logits plus the quantizer loss; the
    /// discriminator is not used.
    fn segmentation_loss(
        &mut self,
        x: Tensor<4>,
        out: &taming_model::vqgan::VqganOutput,
    ) -> GeneratorLog {
        let bce = bce_with_logits(out.reconstruction.clone(), x);
        let quant = out.quantized.loss.clone();
        let total = bce.clone() + quant.clone().mul_scalar(self.config.loss.codebook_weight);
        let scalar = |t: Tensor<1>| t.into_scalar::<f32>() as f64;
        let log = GeneratorLog {
            total: scalar(total.clone()),
            nll: scalar(bce.clone()),
            l1: scalar(bce),
            p_loss: 0.0,
            g_loss: 0.0,
            d_weight: 0.0,
            disc_factor: 0.0,
            quant: scalar(quant),
        };
        let total = total.mul_scalar(self.micro_batch_share());
        let grads = GradientsParams::from_grads(total.backward(), &self.ae.module);
        self.ae.accumulate(grads);
        log
    }

    /// Each micro-batch's share of a step's gradient: accumulated gradients are the mean over
    /// the micro-batches (as Lightning's `accumulate_grad_batches`), so that `grad_accum: N`
    /// at batch B steps as batch N x B does.
    fn micro_batch_share(&self) -> f64 {
        1.0 / self.config.grad_accum as f64
    }

    /// At the first micro-batch of a step: random draws depend on (seed, step) only, so a
    /// resumed run repeats them.
    fn seed_micro_batch(&mut self) {
        if self.accumulation.at_start() {
            let seed = step_seed(self.config.seed, self.step);
            self.device.seed(seed);
            if let Some(m) = self.maintainer.as_mut() {
                m.reseed(seed ^ 0x5EED);
            }
        }
    }

    fn temperature(&self) -> f64 {
        match &self.config.model.quantizer {
            QuantizerConfig::Gumbel(g) => g.temperature.at(self.step),
            _ => 1.0,
        }
    }

    /// Writes a checkpoint of this step into the run folder `run` (keeping the newest `keep`);
    /// `loader` is the training reader's position after the last batch trained on.
    pub fn save_checkpoint(
        &self,
        run: &Path,
        loader: LoaderState,
        keep: usize,
    ) -> Result<PathBuf, CheckpointError> {
        let state = Stage1State {
            step: self.step,
            loader,
            maintainer: self.maintainer.as_ref().map(|m| m.state()),
            lecam: self.lecam,
            skipped: self.skipped,
            lr_scale: self.lr_scale,
        };
        self.discriminator().sync_running_stats();
        checkpoint::write(run, &self.config, &state, keep, |dir| {
            self.ae.save(dir, "model", "opt_ae")?;
            if let Some(ema) = &self.ema {
                ema.save(dir, "model_ema")?;
            }
            self.disc.save(dir, "disc", "opt_d")
        })
    }

    /// Continues the run in `run` from its latest checkpoint; returns the trainer and the
    /// position of the training reader.
    pub fn resume(
        run: &Path,
        nodes: usize,
        device: &Device,
    ) -> Result<(Self, LoaderState), TrainError> {
        let dir = checkpoint::latest(run)?;
        let (config, state): (Stage1Config, Stage1State) = checkpoint::read_meta(&dir)?;
        let mut trainer = Self::new(config, nodes, device)?;
        trainer.ae = trainer.ae.load(&dir, "model", "opt_ae")?;
        trainer.disc = trainer.disc.load(&dir, "disc", "opt_d")?;
        trainer.ema = match trainer.ema {
            Some(ema) => Some(Box::new(ema.load(&dir, "model_ema")?)),
            None => None,
        };
        trainer.step = state.step;
        trainer.lecam = state.lecam;
        trainer.skipped = state.skipped;
        trainer.lr_scale = state.lr_scale;
        if let (Some(m), Some(saved)) = (trainer.maintainer.as_mut(), &state.maintainer) {
            m.restore(saved);
        }
        Ok((trainer, state.loader))
    }

    /// Mean L1 reconstruction error of `x` in evaluation mode (no gradients); for the
    /// segmentation objective, of the label probabilities (sigmoid of the logits).
    pub fn eval_l1(&self, x: Tensor<4>) -> f64 {
        let model = self.eval_model();
        let x = x.inner();
        let mut rec = model.forward(x.clone(), QuantizeMode::EVAL).reconstruction;
        if self.config.objective == Objective::Segmentation {
            rec = burn::tensor::activation::sigmoid(rec);
        }
        (x - rec).abs().mean().into_scalar::<f32>() as f64
    }

    /// What is learned.
    pub fn objective(&self) -> Objective {
        self.config.objective
    }
}

/// Whether the reconstruction and the quantizer loss are finite.
fn finite_output(out: &taming_model::vqgan::VqganOutput) -> bool {
    let sum = out.reconstruction.clone().detach().sum() + out.quantized.loss.clone().detach();
    sum.into_scalar::<f32>().is_finite()
}

/// Codebook maintenance after the optimizer step (vector quantizers): the model, the
/// codebook usage and the number of codes restarted.
fn maintain(
    maintainer: Option<&mut CodebookMaintainer>,
    model: Vqgan,
    latents: Tensor<2>,
    indices: Tensor<1, Int>,
) -> (Vqgan, Option<f64>, usize) {
    let Some(maintainer) = maintainer else {
        return (model, None, 0);
    };
    let (quantize, restarted) = match model.quantize {
        Quantizer::Vector(vq) => {
            let (vq, report) = maintainer.step(vq, latents, indices);
            (Quantizer::Vector(vq), report.restarted.len())
        }
        other => (other, 0),
    };
    let usage = Some(maintainer.usage());
    (Vqgan { quantize, ..model }, usage, restarted)
}

/// Rank 0's quantizer everywhere (codebook maintenance changes it on each rank).
fn sync_codebook(group: &mut Group, model: Vqgan) -> Result<Vqgan, TrainError> {
    let quantize = group.broadcast(model.quantize)?;
    Ok(Vqgan { quantize, ..model })
}

/// The step's code indices flattened, on the device and on the host.
fn flat_codes(indices: Tensor<3, Int>) -> (Tensor<1, Int>, Vec<i64>) {
    let [b, h, w] = indices.dims();
    let flat = indices.reshape([b * h * w]);
    let host = flat.clone().try_into_vec_as::<i64>().expect("indices");
    (flat, host)
}
