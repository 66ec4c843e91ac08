//! The convolution on burn's Flex (CPU) backend through [`winograd`](super::winograd) or
//! [`kernels`](super::kernels): on plain Flex tensors, and as a custom autodiff operation on
//! `Autodiff<Flex>` tensors.

use burn::tensor::Tensor;
use burn::tensor::ops::ConvOptions;
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
use burn_std::Shape;
use rayon::prelude::*;

use crate::cpu::{f32s, tensor};

use super::kernels::{self, Geometry};
use super::winograd;

/// `conv2d` through the CPU kernels when every tensor is an f32 tensor of Flex, or of
/// `Autodiff<Flex>` with an im2col buffer within [`Geometry::fits`] or gradients that
/// Winograd computes ([`winograd::applies`]), and the convolution has one group; `None`
/// otherwise.
pub fn try_conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>> {
    let g = geometry(x.dims(), weight.dims(), options);
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if options.groups != 1 || !f32s {
        return None;
    }
    // The forward alone works on any size; the gradients need the whole im2col buffer, or
    // the Winograd kernels, which work in blocks.
    plain(x, weight, bias, options).or_else(|| {
        (g.fits() || winograd::applies(&g)).then_some(())?;
        with_strategy::<NoCheckpointing>(x, weight, bias, options)
            .or_else(|| with_strategy::<BalancedCheckpointing>(x, weight, bias, options))
    })
}

/// The convolution on plain Flex tensors (no autodiff).
fn plain(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>> {
    let xp = x.clone().try_into_primitive::<Flex>().ok()?;
    let wp = weight.clone().try_into_primitive::<Flex>().ok()?;
    let bp = match bias {
        None => None,
        Some(b) => Some(b.clone().try_into_primitive::<Flex>().ok()?),
    };
    let out = forward_flex(xp, wp, bp, options);
    Some(Tensor::from_primitive::<Flex>(out))
}

fn with_strategy<C>(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>>
where
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<Autodiff<Flex, C>>,
{
    let xp = x.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let wp = weight
        .clone()
        .try_into_primitive::<Autodiff<Flex, C>>()
        .ok()?;
    let out = match bias {
        None => forward::<C, 2>([xp, wp], options),
        Some(b) => {
            let bp = b.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
            forward::<C, 3>([xp, wp, bp], options)
        }
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

/// A float tensor of `Autodiff<Flex>` (any checkpointing).
type AdTensor = FloatTensor<Autodiff<Flex>>;

/// Records the convolution of `inputs` = [x, weight] or [x, weight, bias].
fn forward<C: CheckpointStrategy, const N: usize>(
    inputs: [AdTensor; N],
    options: &ConvOptions<2>,
) -> AdTensor {
    let nodes = inputs.each_ref().map(|t| t.node());
    let run = |inputs: [AdTensor; N]| {
        let mut primitives = inputs.into_iter().map(|t| t.into_primitive());
        let (x, w) = (primitives.next(), primitives.next());
        let (x, w) = (x.expect("an input"), w.expect("a weight"));
        forward_flex(x, w, primitives.next(), options)
    };
    match GemmConv2d::<N>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x = prep.checkpoint(&inputs[0]);
            let w = prep.checkpoint(&inputs[1]);
            prep.finish((x, w, options.clone()), run(inputs))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(inputs)),
    }
}

/// The forward pass on Flex tensors through [`kernels::forward`].
pub fn forward_flex(
    x: FlexTensor,
    w: FlexTensor,
    bias: Option<FlexTensor>,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let (x, w) = (x.to_contiguous(), w.to_contiguous());
    let bias = bias.map(|b| b.to_contiguous());
    let g = geometry(x.shape().dims(), w.shape().dims(), options);
    let [ho, wo] = g.output();
    let (x, w, bias) = (f32s(&x), f32s(&w), bias.as_ref().map(f32s));
    let out = if winograd::applies_forward(&g) {
        winograd::forward(&g, x, w, bias)
    } else {
        kernels::forward(&g, x, w, bias)
    };
    tensor(out, Shape::new([g.batch, g.cout, ho, wo]))
}

/// Backward of a convolution with `N - 2` biases (0 or 1).
#[derive(Debug)]
struct GemmConv2d<const N: usize>;

impl<const N: usize> Backward<Flex, N> for GemmConv2d<N> {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, cp: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x_id, w_id, options) = ops.state;
        let x: FlexTensor = cp.retrieve_node_output(x_id);
        let w: FlexTensor = cp.retrieve_node_output(w_id);
        let (x, w) = (x.to_contiguous(), w.to_contiguous());
        let g = geometry(x.shape().dims(), w.shape().dims(), &options);
        let go = f32s(&grad);
        let mut parents = ops.parents.into_iter();
        let (node_x, node_w, node_b) = (parents.next(), parents.next(), parents.next());
        let (node_x, node_w) = (node_x.flatten(), node_w.flatten());
        let (dx, dw) =
            input_and_weight_grads(&g, [&x, &w], go, [node_x.is_some(), node_w.is_some()]);
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, tensor(dx, x.shape()));
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<Flex>(node.id, tensor(dw, w.shape()));
        }
        if let Some(Some(node)) = node_b {
            let db = bias_grad(&g, go);
            grads.register::<Flex>(node.id, tensor(db, Shape::new([g.cout])));
        }
    }
}

/// The gradients of the input and of the weight, each when `wanted`.
fn input_and_weight_grads(
    g: &Geometry,
    [x, w]: [&FlexTensor; 2],
    go: &[f32],
    wanted: [bool; 2],
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (x, w) = (f32s(x), f32s(w));
    if winograd::applies(g) {
        return winograd::backward(g, x, w, go, wanted);
    }
    (
        wanted[0].then(|| kernels::input_grad(g, w, go)),
        wanted[1].then(|| kernels::weight_grad(g, x, go)),
    )
}

/// The geometry of convolving an input of shape `x` with a weight of shape `w`.
pub(super) fn geometry(x: [usize; 4], w: [usize; 4], options: &ConvOptions<2>) -> Geometry {
    let [batch, cin, h, wi] = x;
    let [cout, _, kh, kw] = w;
    Geometry {
        batch,
        cin,
        input: [h, wi],
        cout,
        kernel: [kh, kw],
        stride: options.stride,
        padding: options.padding,
        dilation: options.dilation,
    }
}

/// Sum of the output gradient over the batch and positions, per output channel.
fn bias_grad(g: &Geometry, go: &[f32]) -> Vec<f32> {
    let [ho, wo] = g.output();
    // One sum per (sample, channel) plane, in parallel, then added per channel in order.
    let sums: Vec<f32> = go
        .par_chunks(ho * wo)
        .with_min_len((4096 / (ho * wo)).max(1))
        .map(crate::fastmath::sum)
        .collect();
    let mut db = vec![0.0f32; g.cout];
    for (i, s) in sums.iter().enumerate() {
        db[i % g.cout] += s;
    }
    db
}
