//! The data-parallel optimizer step both stages share: a module held by value with its
//! optimizer and gradient accumulator ([`Learner`]), micro-batch counting
//! ([`Accumulation`]), and the group whose collectives average gradients and copy parameters,
//! timed ([`Group`]).

use std::path::Path;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;
use taming_collective::{AllReduce, CollectiveError, all_reduce_mean};

use crate::checkpoint::{CheckpointError, load_module, save_module};
use crate::distributed::{broadcast_params, mean_gradients};

/// The data-parallel group of a run (none: a single process), and the time its collectives
/// have taken.
#[derive(Default)]
pub struct Group {
    inner: Option<Box<dyn AllReduce>>,
    comm: Duration,
}

impl Group {
    /// A group over `inner`.
    pub fn new(inner: Box<dyn AllReduce>) -> Self {
        Self {
            inner: Some(inner),
            comm: Duration::ZERO,
        }
    }

    /// Whether other ranks take part.
    pub fn is_distributed(&self) -> bool {
        self.inner.is_some()
    }

    /// Time spent in collectives so far.
    pub fn comm_time(&self) -> Duration {
        self.comm
    }

    /// `grads` of `module` averaged over the group.
    pub fn mean<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, CollectiveError> {
        // The span marks the step's all-reduce in traces, a single process's included.
        let _span = tracing::info_span!("allreduce").entered();
        let Some(group) = self.inner.as_mut() else {
            return Ok(grads);
        };
        let started = Instant::now();
        let out = mean_gradients(group.as_mut(), module, grads);
        self.comm += started.elapsed();
        out
    }

    /// `values` averaged over the group, in place.
    pub fn mean_values(&mut self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let Some(group) = self.inner.as_mut() else {
            return Ok(());
        };
        let started = Instant::now();
        let out = all_reduce_mean(group.as_mut(), values);
        self.comm += started.elapsed();
        out
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&mut self, flag: bool) -> Result<bool, CollectiveError> {
        let mut v = [f32::from(u8::from(flag))];
        self.mean_values(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// `module` with every float parameter replaced by rank 0's.
    pub fn broadcast<M: Module>(&mut self, module: M) -> Result<M, CollectiveError> {
        let Some(group) = self.inner.as_mut() else {
            return Ok(module);
        };
        let started = Instant::now();
        let out = broadcast_params(group.as_mut(), module, 0);
        self.comm += started.elapsed();
        out
    }
}

/// Counts the micro-batches of an optimizer step (`grad_accum` of them).
#[derive(Debug, Clone, Copy)]
pub struct Accumulation {
    every: usize,
    done: usize,
}

impl Accumulation {
    /// Steps every `every` micro-batches (at least one).
    pub fn new(every: usize) -> Self {
        Self {
            every: every.max(1),
            done: 0,
        }
    }

    /// Whether the next micro-batch is the first of its step.
    pub fn at_start(&self) -> bool {
        self.done == 0
    }

    /// Micro-batches counted in the current step.
    pub fn counted(&self) -> usize {
        self.done
    }

    /// Counts a micro-batch; true when it completes the step.
    pub fn count(&mut self) -> bool {
        self.done += 1;
        if self.done < self.every {
            return false;
        }
        self.done = 0;
        true
    }
}

/// A module being trained, held by value, with its optimizer and the gradients accumulated
/// since its last step.
pub struct Learner<M: Module> {
    /// The module.
    pub module: M,
    optim: ModuleOptimizer,
    acc: GradientsAccumulator<M>,
}

impl<M: Module + ModuleSnapshot> Learner<M> {
    /// `module` trained by `optim`.
    pub fn new(module: M, optim: ModuleOptimizer) -> Self {
        Self {
            module,
            optim,
            acc: GradientsAccumulator::new(),
        }
    }

    /// Adds a micro-batch's gradients.
    pub fn accumulate(&mut self, grads: GradientsParams) {
        self.acc.accumulate(&self.module, grads);
    }

    /// Drops the accumulated gradients (a skipped step).
    pub fn discard(&mut self) {
        drop(self.acc.grads());
    }

    /// One optimizer step at `lr` on the accumulated gradients averaged over `group`.
    pub fn step(mut self, lr: f64, group: &mut Group) -> Result<Self, CollectiveError> {
        let grads = group.mean(&self.module, self.acc.grads())?;
        self.module = self.optim.step(lr, self.module, grads);
        Ok(self)
    }

    /// The module with rank 0's parameters (joining a group).
    pub fn synced(mut self, group: &mut Group) -> Result<Self, CollectiveError> {
        self.module = group.broadcast(self.module)?;
        Ok(self)
    }

    /// Writes the module as `{name}.bpk` and the optimizer as `{optim}.bpk` into `dir`.
    pub fn save(&self, dir: &Path, name: &str, optim: &str) -> Result<(), CheckpointError> {
        save_module(&self.module, &dir.join(format!("{name}.bpk")))?;
        let path = dir.join(format!("{optim}.bpk"));
        self.optim
            .save(&path)
            .map_err(|e| CheckpointError::new(&path, format!("{e:?}")))
    }

    /// Reads what [`Self::save`] wrote.
    pub fn load(mut self, dir: &Path, name: &str, optim: &str) -> Result<Self, CheckpointError> {
        load_module(&mut self.module, &dir.join(format!("{name}.bpk")))?;
        let path = dir.join(format!("{optim}.bpk"));
        self.optim = self
            .optim
            .load(&path)
            .map_err(|e| CheckpointError::new(&path, format!("{e:?}")))?;
        Ok(self)
    }
}

/// An exponential moving average of a module's weights: from step `start` on, after every
/// optimizer step, `ema = decay * ema + (1 - decay) * weights` (before `start` it follows
/// the weights). Held on the plain (non-autodiff) device.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// Weight of the past.
    pub decay: f64,
    /// First step that averages (before it the average is the weights themselves).
    #[serde(default)]
    pub start: u64,
}

impl EmaConfig {
    /// Refuses a decay outside [0, 1).
    pub fn validate(&self) -> Result<(), taming_model::ModelError> {
        if (0.0..1.0).contains(&self.decay) {
            return Ok(());
        }
        Err(taming_model::ModelError::Config {
            key: "ema.decay".into(),
            reason: format!("{} is outside [0, 1)", self.decay),
        })
    }
}

/// A module's weight average ([`EmaConfig`]), updated after every optimizer step and
/// checkpointed beside the module.
pub struct Ema<M: Module> {
    config: EmaConfig,
    /// The average (on the plain device).
    pub average: M,
}

impl<M: Module + ModuleSnapshot> Ema<M> {
    /// An average that starts at `weights`.
    pub fn new(config: EmaConfig, weights: &M) -> Self {
        Self {
            config,
            average: weights.valid(),
        }
    }

    /// The average after optimizer step `step` left `weights`: a copy of them up to step
    /// `start`, an exponential average from then on.
    pub fn update(self, weights: &M, step: u64) -> Self {
        let average = if step <= self.config.start {
            weights.valid()
        } else {
            ema_update(self.average, weights, self.config.decay)
        };
        Self {
            average,
            config: self.config,
        }
    }

    /// Writes the average as `{name}.bpk` into `dir`.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), CheckpointError> {
        save_module(&self.average, &dir.join(format!("{name}.bpk")))
    }

    /// Reads what [`Self::save`] wrote.
    pub fn load(mut self, dir: &Path, name: &str) -> Result<Self, CheckpointError> {
        load_module(&mut self.average, &dir.join(format!("{name}.bpk")))?;
        Ok(self)
    }
}

/// `average` moved towards `weights` by `1 - decay` (`decay` 0: a copy).
pub fn ema_update<M: Module>(average: M, weights: &M, decay: f64) -> M {
    struct Flatten(Vec<Tensor<1>>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val().inner();
            let n = t.shape().num_elements();
            self.0.push(t.reshape([n]));
        }
    }
    struct Blend {
        weights: std::vec::IntoIter<Tensor<1>>,
        decay: f64,
    }
    impl burn::module::ModuleMapper for Blend {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let w = self.weights.next().expect("the same parameters");
            let decay = self.decay;
            param.map(|a| {
                let w = w.reshape(a.dims());
                a.mul_scalar(decay) + w.mul_scalar(1.0 - decay)
            })
        }
    }
    let mut flat = Flatten(Vec::new());
    weights.visit(&mut flat);
    average.map(&mut Blend {
        weights: flat.0.into_iter(),
        decay,
    })
}

/// Initializes every lazily initialized parameter of `module` (while a seed holds).
pub fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// The seed of step `step` of a run seeded with `seed` (a splitmix64 step): random draws
/// depend on (seed, step) only, so a resumed run repeats them.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;

    #[test]
    fn the_average_moves_by_one_minus_decay() {
        let device = Device::flex();
        let a: Linear = LinearConfig::new(2, 3).init(&device);
        let w: Linear = LinearConfig::new(2, 3).init(&device);
        let avg = ema_update(a.clone(), &w, 0.75);
        let v = |m: &Linear| m.weight.val().into_data().try_to_vec::<f32>().unwrap();
        for ((x, y), z) in v(&a).iter().zip(v(&w)).zip(v(&avg)) {
            assert!((0.75 * x + 0.25 * y - z).abs() < 1e-6);
        }
        let copy = ema_update(a, &w, 0.0);
        assert_eq!(v(&copy), v(&w));
        assert!(
            EmaConfig {
                decay: 1.0,
                start: 0
            }
            .validate()
            .is_err()
        );
    }
}
