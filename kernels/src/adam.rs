//! Adam with one pass over each parameter on the CPU backend: burn's `Adam` runs about ten
//! tensor operations per parameter (each a pass over memory and a fresh buffer); here the two
//! moments and the parameter are updated in one loop, with the same f32 arithmetic in the same
//! order, so the results equal burn's. The state is burn's `AdamState`, so checkpoints are
//! those of burn's Adam. Other backends, dtypes and AMSGrad run burn's `Adam`.

use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use burn_backend::{DType, TensorMetadata};
use burn_flex::{Flex, FlexTensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu::{f32s, tensor};

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the second moment's square root.
    pub epsilon: f32,
}

/// Adam ([`AdamSettings`]) as a module optimizer.
pub fn adam_optimizer(settings: AdamSettings) -> ModuleOptimizer {
    ModuleOptimizer::from(FusedAdam::new(settings))
}

/// Adam updating each f32 parameter of burn's Flex backend in one pass; burn's `Adam`
/// elsewhere.
#[derive(Clone)]
pub struct FusedAdam {
    settings: AdamSettings,
    burn: Adam,
}

impl FusedAdam {
    /// Adam with these settings.
    pub fn new(settings: AdamSettings) -> Self {
        let burn = AdamConfig::new()
            .with_beta_1(settings.beta_1)
            .with_beta_2(settings.beta_2)
            .with_epsilon(settings.epsilon)
            .build();
        Self { settings, burn }
    }

    fn fused<const D: usize>(
        &self,
        lr: LearningRate,
        param: &Tensor<D>,
        grad: &Tensor<D>,
        state: Option<&AdamState<D>>,
    ) -> Option<(Tensor<D>, AdamState<D>)> {
        let flex = |t: &Tensor<D>| {
            let p = t.clone().try_into_primitive::<Flex>().ok()?;
            (p.dtype() == DType::F32).then(|| p.to_contiguous())
        };
        let (p, g) = (flex(param)?, flex(grad)?);
        let (moments, time) = match state {
            Some(s) if s.momentum.max_moment_2.is_none() => {
                let m = flex(&s.momentum.moment_1)?;
                (Some((m, flex(&s.momentum.moment_2)?)), s.momentum.time + 1)
            }
            Some(_) => return None,
            None => (None, 1),
        };
        let step = Step::new(&self.settings, lr, time);
        let [p, m, v] = step.run(&p, &g, moments.as_ref());
        let [p, m, v] = [p, m, v].map(Tensor::from_primitive::<Flex>);
        let momentum = AdaptiveMomentumState::new(time, m, v);
        Some((p, AdamState::new(momentum)))
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if crate::cpu::kernels_enabled()
            && let Some((param, state)) = self.fused(lr, &tensor, &grad, state.as_ref())
        {
            return (param, Some(state));
        }
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        Adam::to_device(state, device)
    }
}

/// The scalars of one Adam step at step `time` (from 1), computed as burn's Adam does.
#[derive(Debug, Clone, Copy)]
struct Step {
    beta_1: f32,
    beta_2: f32,
    /// `sqrt(1 - beta_2^t) / (1 - beta_1^t)`.
    factor: f32,
    /// `epsilon * sqrt(1 - beta_2^t)`.
    epsilon: f32,
    lr: f32,
}

/// Elements per parallel task: small enough that most weights are split over the threads.
const CHUNK: usize = 1 << 12;

impl Step {
    fn new(s: &AdamSettings, lr: LearningRate, time: usize) -> Self {
        let t = time as i32;
        let correction_2 = (1.0 - s.beta_2.powi(t)).sqrt();
        Self {
            beta_1: s.beta_1,
            beta_2: s.beta_2,
            factor: correction_2 / (1.0 - s.beta_1.powi(t)),
            epsilon: s.epsilon * correction_2,
            lr: lr as f32,
        }
    }

    /// The new parameter and moments from the parameter, the gradient and the two moments
    /// (zero when `None`: the first step).
    fn run(
        &self,
        p: &FlexTensor,
        g: &FlexTensor,
        moments: Option<&(FlexTensor, FlexTensor)>,
    ) -> [FlexTensor; 3] {
        let len = p.shape().num_elements();
        let zeros;
        let (m, v) = match moments {
            Some((m, v)) => (f32s(m), f32s(v)),
            None => {
                zeros = vec![0.0f32; len];
                (&zeros[..], &zeros[..])
            }
        };
        let mut out = [vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]];
        let [po, mo, vo] = &mut out;
        po.par_chunks_mut(CHUNK)
            .zip(mo.par_chunks_mut(CHUNK))
            .zip(vo.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((po, mo), vo))| {
                let range = i * CHUNK..(i * CHUNK + po.len());
                let inputs = [f32s(p), f32s(g), m, v].map(|s| &s[range.clone()]);
                update(self, inputs, [po, mo, vo]);
            });
        out.map(|values| tensor(values, p.shape()))
    }
}

/// One chunk: `[param, grad, m, v]` into `[param', m', v']`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn update(s: &Step, [p, g, m, v]: [&[f32]; 4], [po, mo, vo]: [&mut [f32]; 3]) {
    let (c1, c2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
    for i in 0..po.len() {
        let m1 = m[i] * s.beta_1 + g[i] * c1;
        let m2 = v[i] * s.beta_2 + (g[i] * g[i]) * c2;
        let delta = (m1 * s.factor) / (m2.sqrt() + s.epsilon);
        po[i] = p[i] - delta * s.lr;
        mo[i] = m1;
        vo[i] = m2;
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        t.clone().try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn steps_equal_burns_adam() {
        let device = Device::flex();
        let settings = AdamSettings {
            beta_1: 0.5,
            beta_2: 0.9,
            epsilon: 1e-8,
        };
        let ours = FusedAdam::new(settings);
        let theirs = ours.burn.clone();
        // Longer than one parallel chunk, and not a multiple of it.
        let shape = [3, CHUNK / 2 + 7];
        let mut p = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let mut q = p.clone();
        let (mut s_ours, mut s_theirs) = (None, None);
        for step in 0..4 {
            let g = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.1), &device);
            let fused = ours.fused(2e-3, &p, &g, s_ours.as_ref());
            let (p2, s2) = fused.expect("the fused path on Flex");
            let (q2, t2) = theirs.step(2e-3, q, g, s_theirs);
            let t2 = t2.unwrap();
            let worst = values(&p2)
                .iter()
                .zip(values(&q2))
                .fold(0.0f32, |w, (a, b)| w.max((a - b).abs()));
            assert!(worst <= 1e-6, "step {step}: parameters off by {worst}");
            assert_eq!(s2.momentum.time, t2.momentum.time);
            assert_eq!(values(&s2.momentum.moment_1), values(&t2.momentum.moment_1));
            assert_eq!(values(&s2.momentum.moment_2), values(&t2.momentum.moment_2));
            (p, q, s_ours, s_theirs) = (p2, q2, Some(s2), Some(t2));
        }
    }

    #[test]
    fn other_backends_and_amsgrad_take_burns_path() {
        let settings = AdamSettings {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
        };
        let adam = FusedAdam::new(settings);
        let ad = Device::flex().autodiff();
        let p = Tensor::<1>::ones([4], &ad);
        assert!(adam.fused(1e-3, &p, &p, None).is_none(), "autodiff tensors");
        let flex = Device::flex();
        let p = Tensor::<1>::ones([4], &flex);
        let (_, mut state) = adam.fused(1e-3, &p, &p, None).unwrap();
        state.momentum.max_moment_2 = Some(p.clone());
        assert!(adam.fused(1e-3, &p, &p, Some(&state)).is_none(), "amsgrad");
    }
}
