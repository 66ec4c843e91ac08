//! The stage-1 training step: ONE autoencoder forward per step, the generator update from
//! the reference's objective (see `taming_model::loss::vqperceptual`), then the discriminator
//! update on the same, detached reconstruction (the reference recomputes it).

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use taming_collective::{AllReduce, CollectiveError};

use crate::distributed::{broadcast_params, mean_gradients};
use burn::tensor::{Device, Int, Tensor, TensorData};
use taming_dataloader::ImageBatch;
use taming_model::Vqgan;
use taming_kernels::adam::{AdamSettings, adam_optimizer};
use taming_model::config::QuantizerConfig;
use taming_model::error::ModelError;
use taming_model::loss::{GeneratorLog, LastLayer, Lpips, NLayerDiscriminator, VqLoss};
use taming_model::quantize::{CodebookMaintainer, QuantizeMode, Quantizer, perplexity};

use std::path::{Path, PathBuf};

use taming_dataloader::LoaderState;

use super::config::{Objective, Stage1Config};
use crate::checkpoint::{self, CheckpointError, TrainState, load_module, save_module};

/// Why training could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad config, weights or model files.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The data-parallel group failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
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
    /// Codebook usage over the recent-token window (vector quantizers).
    pub usage: Option<f64>,
    /// Per-batch perplexity of the codes.
    pub perplexity: f64,
    /// Codes restarted from the batch by dead-code restart in this step.
    pub restarted: usize,
}

/// Stage-1 trainer state: models, optimizers, step.
pub struct Stage1Trainer {
    model: Option<Vqgan>,
    disc: Option<NLayerDiscriminator>,
    opt_ae: ModuleOptimizer,
    opt_d: ModuleOptimizer,
    acc_ae: GradientsAccumulator<Vqgan>,
    acc_d: GradientsAccumulator<NLayerDiscriminator>,
    micro: usize,
    loss: VqLoss,
    maintainer: Option<CodebookMaintainer>,
    config: Stage1Config,
    lr: f64,
    step: u64,
    device: Device,
    group: Option<Box<dyn AllReduce>>,
    comm: std::time::Duration,
}

/// The reference's Adam (betas 0.5, 0.9), one pass per parameter on the CPU backend.
fn adam(clip: Option<f32>) -> ModuleOptimizer {
    let settings = AdamSettings {
        beta_1: 0.5,
        beta_2: 0.9,
        epsilon: 1e-8,
    };
    adam_optimizer(settings, clip.map(GradientClippingConfig::Norm))
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
            QuantizerConfig::Gumbel(_) => None,
        };
        Ok(Self {
            model: Some(model),
            disc: Some(disc),
            opt_ae: adam(config.grad_clip),
            opt_d: adam(config.grad_clip),
            acc_ae: GradientsAccumulator::new(),
            acc_d: GradientsAccumulator::new(),
            micro: 0,
            loss: VqLoss::new(config.loss.clone(), lpips),
            maintainer,
            lr: config.learning_rate(nodes),
            config,
            step: 0,
            device: device.clone(),
            group: None,
            comm: std::time::Duration::ZERO,
        })
    }

    /// Joins a data-parallel group: the model and discriminator are replaced by rank 0's, and
    /// from now on gradients are averaged over the group before every optimizer step and the
    /// codebook (which each rank's maintenance changes) is copied from rank 0 after it.
    pub fn join_group(&mut self, mut group: Box<dyn AllReduce>) -> Result<(), CollectiveError> {
        let model = self.model.take().expect("model");
        let disc = self.disc.take().expect("discriminator");
        self.model = Some(broadcast_params(group.as_mut(), model, 0)?);
        self.disc = Some(broadcast_params(group.as_mut(), disc, 0)?);
        self.group = Some(group);
        Ok(())
    }

    /// Time spent in collectives (gradient means, codebook broadcasts) so far.
    pub fn comm_time(&self) -> std::time::Duration {
        self.comm
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The learning rate in force.
    pub fn learning_rate(&self) -> f64 {
        self.lr
    }

    /// The autoencoder being trained.
    pub fn model(&self) -> &Vqgan {
        self.model.as_ref().expect("model present between steps")
    }

    /// The discriminator being trained.
    pub fn discriminator(&self) -> &NLayerDiscriminator {
        self.disc
            .as_ref()
            .expect("discriminator present between steps")
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

    /// One micro-batch; every `grad_accum` micro-batches the optimizers step and a report is
    /// returned. Panics if a collective fails: group members use [`Self::try_train_batch`].
    pub fn train_batch(&mut self, x: Tensor<4>) -> Option<StepReport> {
        self.try_train_batch(x).expect("collective")
    }

    /// [`Self::train_batch`], with the errors of the data-parallel group returned.
    pub fn try_train_batch(&mut self, x: Tensor<4>) -> Result<Option<StepReport>, CollectiveError> {
        self.try_train_batch_with(x, None)
    }

    /// [`Self::try_train_batch`] with the discriminator's condition ([`Self::condition`]),
    /// which a `disc_conditional` config needs.
    pub fn try_train_batch_with(
        &mut self,
        x: Tensor<4>,
        cond: Option<Tensor<4>>,
    ) -> Result<Option<StepReport>, CollectiveError> {
        if self.config.objective == Objective::Segmentation {
            return self.train_segmentation(x);
        }
        self.seed_micro_batch();
        let model = self.model.take().expect("model");
        let disc = self.disc.take().expect("discriminator");
        let mode = QuantizeMode {
            training: true,
            temperature: self.temperature(),
        };
        let out = model.forward(x.clone(), mode);
        let last = LastLayer {
            input: out.last_input.clone(),
            weight: model.last_layer_weight(),
        };
        let generator = self.loss.generator(
            &disc,
            x.clone(),
            out.reconstruction.clone(),
            out.quantized.loss.clone(),
            &last,
            self.step,
            cond.as_ref(),
        );
        let grads = GradientsParams::from_grads(generator.surrogate.backward(), &model);
        self.acc_ae.accumulate(&model, grads);
        let d = self.loss.discriminator(
            &disc,
            x,
            out.reconstruction.detach(),
            self.step,
            cond.as_ref(),
        );
        let d_loss = d.map(|(loss, _, _)| {
            let value = loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &disc);
            self.acc_d.accumulate(&disc, grads);
            value
        });
        if !self.micro_batch_done() {
            self.model = Some(model);
            self.disc = Some(disc);
            return Ok(None);
        }
        // Codebook maintenance and perplexity see the step's last micro-batch.
        let (flat, host) = flat_codes(out.quantized.indices);
        let grads_ae = self.acc_ae.grads();
        let grads_ae = self.synced(&model, grads_ae)?;
        let model = self.opt_ae.step(self.lr, model, grads_ae);
        let disc = if d_loss.is_some() {
            let grads_d = self.acc_d.grads();
            let grads_d = self.synced(&disc, grads_d)?;
            self.opt_d.step(self.lr, disc, grads_d)
        } else {
            disc
        };
        let (model, usage, restarted) = self.maintain(model, out.quantized.lookup_latents, flat);
        let model = self.sync_codebook(model)?;
        self.model = Some(model);
        self.disc = Some(disc);
        self.step += 1;
        Ok(Some(StepReport {
            step: self.step,
            generator: generator.log,
            d_loss,
            usage,
            perplexity: perplexity(&host, self.config.model.n_embed),
            restarted,
        }))
    }

    /// The segmentation objective: BCE on the logits plus the quantizer loss; the
    /// discriminator is not used.
    fn train_segmentation(&mut self, x: Tensor<4>) -> Result<Option<StepReport>, CollectiveError> {
        self.seed_micro_batch();
        let model = self.model.take().expect("model");
        let out = model.forward(
            x.clone(),
            QuantizeMode {
                training: true,
                temperature: self.temperature(),
            },
        );
        let bce = bce_with_logits(out.reconstruction, x);
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
        let grads = GradientsParams::from_grads(total.backward(), &model);
        self.acc_ae.accumulate(&model, grads);
        if !self.micro_batch_done() {
            self.model = Some(model);
            return Ok(None);
        }
        let (flat, host) = flat_codes(out.quantized.indices);
        let grads = self.acc_ae.grads();
        let grads = self.synced(&model, grads)?;
        let model = self.opt_ae.step(self.lr, model, grads);
        let (model, usage, restarted) = self.maintain(model, out.quantized.lookup_latents, flat);
        self.model = Some(self.sync_codebook(model)?);
        self.step += 1;
        Ok(Some(StepReport {
            step: self.step,
            generator: log,
            d_loss: None,
            usage,
            perplexity: perplexity(&host, self.config.model.n_embed),
            restarted,
        }))
    }

    /// At the first micro-batch of a step: random draws depend on (seed, step) only, so a
    /// resumed run repeats them.
    fn seed_micro_batch(&mut self) {
        if self.micro == 0 {
            let seed = step_seed(self.config.seed, self.step);
            self.device.seed(seed);
            if let Some(m) = self.maintainer.as_mut() {
                m.reseed(seed ^ 0x5EED);
            }
        }
    }

    /// Counts a micro-batch; true when the step's last one is in and the optimizers step.
    fn micro_batch_done(&mut self) -> bool {
        self.micro += 1;
        if self.micro < self.config.grad_accum {
            return false;
        }
        self.micro = 0;
        true
    }

    fn synced<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, CollectiveError> {
        let started = std::time::Instant::now();
        let _span = tracing::info_span!("allreduce").entered();
        let out = match self.group.as_mut() {
            Some(group) => mean_gradients(group.as_mut(), module, grads),
            None => Ok(grads),
        };
        self.comm += started.elapsed();
        out
    }

    /// Rank 0's quantizer everywhere, when codebook maintenance changed it locally.
    fn sync_codebook(&mut self, model: Vqgan) -> Result<Vqgan, CollectiveError> {
        let (Some(group), Some(_)) = (self.group.as_mut(), self.maintainer.as_ref()) else {
            return Ok(model);
        };
        let started = std::time::Instant::now();
        let quantize = broadcast_params(group.as_mut(), model.quantize, 0)?;
        self.comm += started.elapsed();
        Ok(Vqgan { quantize, ..model })
    }

    fn temperature(&self) -> f64 {
        match &self.config.model.quantizer {
            QuantizerConfig::Gumbel(g) => g.temperature.at(self.step),
            QuantizerConfig::Vector(_) => 1.0,
        }
    }

    /// Codebook maintenance after the optimizer step (vector quantizers): the model, the
    /// codebook usage and the number of codes restarted.
    fn maintain(
        &mut self,
        model: Vqgan,
        latents: Tensor<2>,
        indices: Tensor<1, Int>,
    ) -> (Vqgan, Option<f64>, usize) {
        let Some(maintainer) = self.maintainer.as_mut() else {
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

    /// Writes a checkpoint of this step into the run folder `run` (keeping the newest `keep`);
    /// `loader` is the training reader's position after the last batch trained on.
    pub fn save_checkpoint(
        &self,
        run: &Path,
        loader: LoaderState,
        keep: usize,
    ) -> Result<PathBuf, CheckpointError> {
        let state = TrainState {
            step: self.step,
            loader,
            maintainer: self.maintainer.as_ref().map(|m| m.state()),
        };
        self.discriminator().sync_running_stats();
        checkpoint::write(run, &self.config, &state, keep, |dir| {
            save_module(self.model(), &dir.join("model.bpk"))?;
            save_module(self.discriminator(), &dir.join("disc.bpk"))?;
            for (optim, name) in [(&self.opt_ae, "opt_ae.bpk"), (&self.opt_d, "opt_d.bpk")] {
                let path = dir.join(name);
                optim
                    .save(&path)
                    .map_err(|e| CheckpointError::new(&path, format!("{e:?}")))?;
            }
            Ok(())
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
        let (config, state): (Stage1Config, TrainState) = checkpoint::read_meta(&dir)?;
        let mut trainer = Self::new(config, nodes, device)?;
        load_module(
            trainer.model.as_mut().expect("model"),
            &dir.join("model.bpk"),
        )?;
        load_module(
            trainer.disc.as_mut().expect("discriminator"),
            &dir.join("disc.bpk"),
        )?;
        let load_optim = |optim: ModuleOptimizer, name: &str| {
            let path = dir.join(name);
            optim
                .load(&path)
                .map_err(|e| CheckpointError::new(&path, format!("{e:?}")))
        };
        trainer.opt_ae = load_optim(trainer.opt_ae, "opt_ae.bpk")?;
        trainer.opt_d = load_optim(trainer.opt_d, "opt_d.bpk")?;
        trainer.step = state.step;
        if let (Some(m), Some(saved)) = (trainer.maintainer.as_mut(), &state.maintainer) {
            m.restore(saved);
        }
        Ok((trainer, state.loader))
    }

    /// Mean L1 reconstruction error of `x` in evaluation mode (no gradients); for the
    /// segmentation objective, of the label probabilities (sigmoid of the logits).
    pub fn eval_l1(&self, x: Tensor<4>) -> f64 {
        let model = self.model().valid();
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

/// The step's code indices flattened, on the device and on the host.
fn flat_codes(indices: Tensor<3, Int>) -> (Tensor<1, Int>, Vec<i64>) {
    let [b, h, w] = indices.dims();
    let flat = indices.reshape([b * h * w]);
    let host = flat.clone().try_into_vec_as::<i64>().expect("indices");
    (flat, host)
}

/// Mean binary cross-entropy of logits `z` against targets `y` in [0, 1], computed stably as
/// `max(z, 0) - z y + log(1 + exp(-|z|))`.
pub fn bce_with_logits(z: Tensor<4>, y: Tensor<4>) -> Tensor<1> {
    let softplus = z.clone().abs().neg().exp().add_scalar(1.0).log();
    (z.clone().clamp_min(0.0) - z * y + softplus).mean()
}

/// Initializes every lazily initialized parameter of `module`.
pub(crate) fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// The seed of step `step` of a run seeded with `seed` (a splitmix64 step).
pub(crate) fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
