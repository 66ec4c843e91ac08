//! Host staging for data parallelism: a module's gradients ([`FlatGradients`]) and
//! parameters ([`flatten_params`]) as `f32` buffers in the module's visiting order, which is
//! the same on every rank, for the group's collectives (`crate::learner::Group`) to average
//! or copy from one rank to all.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

/// The gradients of a module as one host buffer, in the module's visiting order: a presence
/// flag per parameter, then every parameter's values (zeros where it has no gradient).
pub struct FlatGradients {
    entries: Vec<Entry>,
    /// Flags, then values.
    pub values: Vec<f32>,
}

impl FlatGradients {
    /// Moves the gradients of `module`'s parameters out of `grads` into one buffer. A
    /// parameter that has a gradient on any rank gets one everywhere after the mean (zeros
    /// stand in for ranks where it had none), so every rank's optimizer sees the same set.
    pub fn take<M: Module>(module: &M, grads: &mut GradientsParams) -> Self {
        let mut collect = Collect {
            grads,
            entries: Vec::new(),
            values: Vec::new(),
        };
        module.visit(&mut collect);
        let Collect {
            entries,
            mut values,
            ..
        } = collect;
        let mut buf: Vec<f32> = entries.iter().map(|e| e.present as u8 as f32).collect();
        buf.append(&mut values);
        Self {
            entries,
            values: buf,
        }
    }

    /// Puts the (averaged) buffer back into `grads`: a parameter gets a gradient when its
    /// flag is non-zero.
    pub fn restore<M: Module>(&self, module: &M, grads: &mut GradientsParams) {
        let (flags, values) = self.values.split_at(self.entries.len());
        let mut restore = Restore {
            grads,
            entries: &self.entries,
            flags,
            values,
            next: 0,
            offset: 0,
        };
        module.visit(&mut restore);
    }
}

/// Every float parameter of `module`, end to end in visiting order.
pub fn flatten_params<M: Module>(module: &M) -> Vec<f32> {
    let mut flat = Flatten { values: Vec::new() };
    module.visit(&mut flat);
    flat.values
}

/// `module` with its float parameters read from `values` (what [`flatten_params`] gives).
pub fn unflatten_params<M: Module>(module: M, values: &[f32]) -> M {
    module.map(&mut Unflatten { values, offset: 0 })
}

struct Entry {
    id: ParamId,
    shape: Vec<usize>,
    present: bool,
}

struct Collect<'a> {
    grads: &'a mut GradientsParams,
    entries: Vec<Entry>,
    values: Vec<f32>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let len: usize = shape.iter().product();
        let present = match self.grads.remove::<D>(param.id) {
            Some(g) => {
                self.values
                    .extend(g.into_data().try_to_vec::<f32>().expect("f32 gradients"));
                true
            }
            None => {
                self.values.extend(std::iter::repeat_n(0.0, len));
                false
            }
        };
        self.entries.push(Entry {
            id: param.id,
            shape,
            present,
        });
    }
}

struct Restore<'a> {
    grads: &'a mut GradientsParams,
    entries: &'a [Entry],
    flags: &'a [f32],
    values: &'a [f32],
    next: usize,
    offset: usize,
}

impl ModuleVisitor for Restore<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let e = &self.entries[self.next];
        debug_assert_eq!(e.id, param.id);
        let len: usize = e.shape.iter().product();
        let values = &self.values[self.offset..self.offset + len];
        if self.flags[self.next] > 0.0 {
            let device = param.val().device();
            let data = TensorData::new(values.to_vec(), e.shape.clone());
            self.grads
                .register::<D>(e.id, Tensor::<D>::from_data(data, &device).inner());
        }
        self.next += 1;
        self.offset += len;
    }
}

struct Flatten {
    values: Vec<f32>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.values.extend(
            param
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32 parameters"),
        );
    }
}

struct Unflatten<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let shape = t.dims().to_vec();
            let len: usize = shape.iter().product();
            let values = self.values[self.offset..self.offset + len].to_vec();
            self.offset += len;
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &t.device());
            if t.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}
