//! The data-parallel optimizer step both stages share: a module held by value with its
//! optimizer and gradient accumulator ([`Learner`]), micro-batch counting
//! ([`Accumulation`]), and the group whose collectives average gradients and copy parameters,
//! timed ([`Group`]).

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;
use taming_collective::{AllReduce, CollectiveError, all_reduce_mean};
use taming_model::quantize::GroupMean;

use crate::checkpoint::{CheckpointError, load_module, save_module};
use crate::distributed::{FlatGradients, flatten_params, unflatten_params};

/// A group lent to a forward pass, for the quantizer statistics it averages over the ranks
/// ([`GroupMean`]; a distributed group only).
pub struct ForwardGroup<'a>(std::cell::RefCell<&'a mut Group>);

impl<'a> ForwardGroup<'a> {
    /// `group` for one forward pass; none when it is a single process.
    pub fn lend(group: &'a mut Group) -> Option<Self> {
        group
            .is_distributed()
            .then(|| Self(std::cell::RefCell::new(group)))
    }
}

impl GroupMean for ForwardGroup<'_> {
    fn mean(&self, values: &mut [f32]) -> bool {
        match self.0.borrow_mut().mean_values(values) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("averaging quantizer statistics over the group: {e}");
                false
            }
        }
    }
}

/// The data-parallel group of a run (none: a single process), and the time the trainer
/// has waited for its collectives. Collectives run in the order they are called on a
/// communication thread of their own, so that a gradient mean started with
/// [`Group::start_mean`] proceeds while the trainer computes.
#[derive(Default)]
pub struct Group {
    inner: Option<CommThread>,
    comm: Duration,
}

impl Group {
    /// A group over `inner`, whose started means overlap the caller's work.
    pub fn new(inner: Box<dyn AllReduce>) -> Self {
        Self::with_overlap(inner, true)
    }

    /// A group over `inner`; with `overlap` false a started mean completes before
    /// [`Group::start_mean`] returns (every collective waits, as without a thread).
    pub fn with_overlap(inner: Box<dyn AllReduce>, overlap: bool) -> Self {
        Self {
            inner: Some(CommThread::spawn(inner, overlap)),
            comm: Duration::ZERO,
        }
    }

    /// Whether other ranks take part.
    pub fn is_distributed(&self) -> bool {
        self.inner.is_some()
    }

    /// Time the trainer has waited for collectives (flattening and restoring included):
    /// the communication a step exposes.
    pub fn comm_time(&self) -> Duration {
        self.comm
    }

    /// `grads` of `module` averaged over the group.
    pub fn mean<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, CollectiveError> {
        let pending = self.start_mean(module, grads);
        self.finish_mean(pending, module)
    }

    /// Starts averaging `grads` of `module` over the group; [`Group::finish_mean`] waits for
    /// the result. Every rank starts and finishes its collectives in the same order.
    pub fn start_mean<M: Module>(&mut self, module: &M, mut grads: GradientsParams) -> PendingMean {
        let Some(comm) = self.inner.as_mut() else {
            return PendingMean { grads, flat: None };
        };
        let started = Instant::now();
        let mut flat = FlatGradients::take(module, &mut grads);
        let reply = comm.submit(Op::Mean, std::mem::take(&mut flat.values));
        self.comm += started.elapsed();
        PendingMean {
            grads,
            flat: Some((flat, reply)),
        }
    }

    /// The averaged gradients of a started mean.
    pub fn finish_mean<M: Module>(
        &mut self,
        pending: PendingMean,
        module: &M,
    ) -> Result<GradientsParams, CollectiveError> {
        // The span marks the step's all-reduce in traces, a single process's included.
        let _span = tracing::info_span!("allreduce").entered();
        let PendingMean { mut grads, flat } = pending;
        let Some((mut flat, reply)) = flat else {
            return Ok(grads);
        };
        let started = Instant::now();
        let out = reply.wait().map(|values| {
            flat.values = values;
            flat.restore(module, &mut grads);
        });
        self.comm += started.elapsed();
        out.map(|()| grads)
    }

    /// `values` averaged over the group, in place.
    pub fn mean_values(&mut self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let mean = self.run(Op::Mean, values.to_vec())?;
        values.copy_from_slice(&mean);
        Ok(())
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&mut self, flag: bool) -> Result<bool, CollectiveError> {
        let mut v = [f32::from(u8::from(flag))];
        self.mean_values(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// `module` with every float parameter replaced by rank 0's.
    pub fn broadcast<M: Module>(&mut self, module: M) -> Result<M, CollectiveError> {
        if self.inner.is_none() {
            return Ok(module);
        }
        let values = self.run(Op::Broadcast { root: 0 }, flatten_params(&module))?;
        Ok(unflatten_params(module, &values))
    }

    /// Runs `op` on `values` and waits for the result (`values` as they are in a single
    /// process).
    fn run(&mut self, op: Op, values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        let Some(comm) = self.inner.as_mut() else {
            return Ok(values);
        };
        let started = Instant::now();
        let out = comm.submit(op, values).wait();
        self.comm += started.elapsed();
        out
    }
}

/// A gradient mean started by [`Group::start_mean`] (dropping it leaves the collective to
/// complete on the communication thread, its result unused).
pub struct PendingMean {
    grads: GradientsParams,
    flat: Option<(FlatGradients, Reply)>,
}

/// A collective on the communication thread.
#[derive(Debug, Clone, Copy)]
enum Op {
    Mean,
    Broadcast { root: usize },
}

type Outcome = Result<Vec<f32>, CollectiveError>;

/// One queued collective and where its outcome goes.
type Job = (Op, Vec<f32>, mpsc::Sender<Outcome>);

/// The outcome of one submitted collective: still running, or already known.
enum Reply {
    Running {
        rx: mpsc::Receiver<Outcome>,
        rank: usize,
    },
    Done(Outcome),
}

impl Reply {
    fn wait(self) -> Outcome {
        match self {
            Self::Done(out) => out,
            Self::Running { rx, rank } => rx.recv().unwrap_or_else(|_| {
                Err(CollectiveError::Protocol {
                    rank,
                    reason: "the communication thread ended".into(),
                })
            }),
        }
    }
}

/// The thread that runs a group's collectives in submission order.
struct CommThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    rank: usize,
    overlap: bool,
}

impl CommThread {
    fn spawn(mut group: Box<dyn AllReduce>, overlap: bool) -> Self {
        let rank = group.rank();
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("collectives".into())
            .spawn(move || {
                for (op, mut values, reply) in rx {
                    let out = match op {
                        Op::Mean => all_reduce_mean(group.as_mut(), &mut values),
                        Op::Broadcast { root } => group.broadcast(&mut values, root),
                    };
                    let _ = reply.send(out.map(|()| values));
                }
            })
            .expect("spawning the collectives thread");
        Self {
            jobs: Some(jobs),
            thread: Some(thread),
            rank,
            overlap,
        }
    }

    /// Queues `op` on `values`; without overlap, waits for it before returning.
    fn submit(&mut self, op: Op, values: Vec<f32>) -> Reply {
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send((op, values, tx));
        }
        let running = Reply::Running {
            rx,
            rank: self.rank,
        };
        if self.overlap {
            running
        } else {
            Reply::Done(running.wait())
        }
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    /// The accumulated gradients' mean, started before the step.
    pending: Option<PendingMean>,
    /// The largest global l2 norm of the gradients a step applies.
    clip: Option<f32>,
}

impl<M: Module + ModuleSnapshot> Learner<M> {
    /// `module` trained by `optim`.
    pub fn new(module: M, optim: ModuleOptimizer) -> Self {
        Self {
            module,
            optim,
            acc: GradientsAccumulator::new(),
            pending: None,
            clip: None,
        }
    }

    /// Clips each step's averaged gradients to a global l2 norm of at most `max_norm`
    /// ([`clip_global_norm`]); `None`: no clipping.
    pub fn with_clip(mut self, max_norm: Option<f32>) -> Self {
        self.clip = max_norm;
        self
    }

    /// Adds a micro-batch's gradients.
    pub fn accumulate(&mut self, grads: GradientsParams) {
        self.acc.accumulate(&self.module, grads);
    }

    /// Drops the accumulated gradients (a skipped step), and a started mean's result.
    pub fn discard(&mut self) {
        self.pending = None;
        drop(self.acc.grads());
    }

    /// Starts averaging the accumulated gradients over `group` (the micro-batches of this
    /// step are all in): the next [`Self::step`] uses the mean, which meanwhile runs on the
    /// group's communication thread while the caller computes.
    pub fn start_mean(&mut self, group: &mut Group) {
        self.pending = Some(group.start_mean(&self.module, self.acc.grads()));
    }

    /// One optimizer step at `lr` on the accumulated gradients averaged over `group` (the
    /// mean started by [`Self::start_mean`], if any).
    pub fn step(mut self, lr: f64, group: &mut Group) -> Result<Self, CollectiveError> {
        let mut grads = match self.pending.take() {
            Some(pending) => group.finish_mean(pending, &self.module)?,
            None => group.mean(&self.module, self.acc.grads())?,
        };
        if let Some(max_norm) = self.clip {
            clip_global_norm(&self.module, &mut grads, max_norm);
        }
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

/// Scales the gradients of `module`'s parameters in `grads` so that their global l2 norm
/// (over all of them together) is at most `max_norm`, as torch's `clip_grad_norm_` (and so
/// Lightning's `gradient_clip_val`) does: by `max_norm / (norm + 1e-6)` when that is below
/// one. Returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    struct SquaredSum<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredSum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut squared = SquaredSum { grads, sum: None };
    module.visit(&mut squared);
    let Some(sum) = squared.sum else {
        return 0.0;
    };
    let norm = sum.into_scalar::<f32>().sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        module.visit(&mut Scale { grads, factor });
    }
    norm
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
