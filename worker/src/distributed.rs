//! Data parallelism for the trainers: gradients averaged over ranks through any
//! [`AllReduce`] (NCCL or the TCP ring), and parameters copied from one rank to all (at the
//! start, after a resume, and for state that each rank changes on its own, such as codebook
//! maintenance). Tensors are staged through host `f32` buffers in the module's visiting
//! order, which is the same on every rank.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use taming_collective::{AllReduce, CollectiveError, all_reduce_mean};

/// Replaces `grads` by their mean over the group. A parameter that has a gradient on any
/// rank gets one everywhere (zeros stand in for ranks where it had none), so every rank's
/// optimizer sees the same set.
pub fn mean_gradients<M: Module>(
    group: &mut dyn AllReduce,
    module: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams, CollectiveError> {
    if group.world_size() == 1 {
        return Ok(grads);
    }
    let mut collect = Collect {
        grads: &mut grads,
        entries: Vec::new(),
        values: Vec::new(),
    };
    module.visit(&mut collect);
    let Collect {
        entries,
        mut values,
        ..
    } = collect;
    // Presence flags first, then the values.
    let mut buf: Vec<f32> = entries.iter().map(|e| e.present as u8 as f32).collect();
    buf.append(&mut values);
    all_reduce_mean(group, &mut buf)?;
    let (flags, values) = buf.split_at(entries.len());
    let mut restore = Restore {
        grads: &mut grads,
        entries: &entries,
        flags,
        values,
        next: 0,
        offset: 0,
    };
    module.visit(&mut restore);
    Ok(grads)
}

/// Every float parameter of `module` replaced by `root`'s.
pub fn broadcast_params<M: Module>(
    group: &mut dyn AllReduce,
    module: M,
    root: usize,
) -> Result<M, CollectiveError> {
    if group.world_size() == 1 {
        return Ok(module);
    }
    let mut flat = Flatten { values: Vec::new() };
    module.visit(&mut flat);
    let mut values = flat.values;
    group.broadcast(&mut values, root)?;
    Ok(module.map(&mut Unflatten {
        values: &values,
        offset: 0,
    }))
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
