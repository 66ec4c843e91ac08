//! GroupNorm (+ swish) on burn's Flex backend through [`kernels`](super::kernels): on plain
//! Flex tensors, and as a custom autodiff operation on `Autodiff<Flex>` tensors.

use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};
use burn_backend::tensor::FloatTensor;
use burn_backend::{DType, TensorMetadata};
use burn_dispatch::{DispatchKindConversion, DispatchTensor};
use burn_flex::{Flex, FlexTensor};

use super::kernels::{self, Shape};
use crate::cpu::{f32s, tensor};

/// The input, gamma and beta.
pub type Inputs<'a> = (&'a Tensor<4>, &'a Tensor<1>, &'a Tensor<1>);

/// The fused operation when all three tensors are f32 tensors of Flex or `Autodiff<Flex>`;
/// `None` otherwise.
pub fn try_group_norm(inputs: Inputs, shape: Shape) -> Option<Tensor<4>> {
    let (x, gamma, beta) = inputs;
    if [x.dtype(), gamma.dtype(), beta.dtype()] != [DType::F32; 3] {
        return None;
    }
    plain(inputs, shape)
        .or_else(|| tracked::<NoCheckpointing>(inputs, shape))
        .or_else(|| tracked::<BalancedCheckpointing>(inputs, shape))
}

fn plain((x, gamma, beta): Inputs, shape: Shape) -> Option<Tensor<4>> {
    let xp = x.clone().try_into_primitive::<Flex>().ok()?;
    let gp = gamma.clone().try_into_primitive::<Flex>().ok()?;
    let bp = beta.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(forward_flex(
        xp, gp, bp, shape,
    )))
}

fn tracked<C>((x, gamma, beta): Inputs, shape: Shape) -> Option<Tensor<4>>
where
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<Autodiff<Flex, C>>,
{
    let xp = x.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let gp = gamma
        .clone()
        .try_into_primitive::<Autodiff<Flex, C>>()
        .ok()?;
    let bp = beta
        .clone()
        .try_into_primitive::<Autodiff<Flex, C>>()
        .ok()?;
    let inputs = [xp, gp, bp];
    let nodes = inputs.each_ref().map(|t| t.node());
    let run = |inputs: [FloatTensor<Autodiff<Flex>>; 3]| {
        let [x, g, b] = inputs.map(|t| t.into_primitive());
        forward_flex(x, g, b, shape)
    };
    let out = match GroupNormOp.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let ids = inputs.each_ref().map(|t| prep.checkpoint(t));
            prep.finish((ids, shape), run(inputs))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(inputs)),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

fn forward_flex(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, shape: Shape) -> FlexTensor {
    let [x, gamma, beta] = [x, gamma, beta].map(|t| t.to_contiguous());
    let out = kernels::forward(&shape, f32s(&x), f32s(&gamma), f32s(&beta));
    tensor(out, x.shape())
}

/// Backward of the fused GroupNorm (+ swish).
#[derive(Debug)]
struct GroupNormOp;

impl Backward<Flex, 3> for GroupNormOp {
    type State = ([NodeId; 3], Shape);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, cp: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (ids, shape) = ops.state;
        let [x, gamma, beta] =
            ids.map(|id| cp.retrieve_node_output::<FlexTensor>(id).to_contiguous());
        let (dx, dgamma, dbeta) =
            kernels::backward(&shape, f32s(&x), f32s(&gamma), f32s(&beta), f32s(&dy));
        let [node_x, node_g, node_b] = ops.parents;
        for (node, (values, like)) in
            [node_x, node_g, node_b]
                .into_iter()
                .zip([(dx, &x), (dgamma, &gamma), (dbeta, &beta)])
        {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, tensor(values, like.shape()));
            }
        }
    }
}
