//! 2-d convolutions for every model here: burn's `Conv2d` parameters, with the forward and
//! backward passes on the CPU backend computed by Winograd's F(2x2, 3x3) for the 3x3
//! convolutions it serves (see [`winograd`]) and as wide GEMMs over im2col buffers for the
//! others (see [`kernels`]).
//!
//! On other backends, with several groups or other dtypes, burn's own operation runs.

mod flex;
pub mod kernels;
pub mod winograd;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;

/// `conv.forward(x)`, through [`conv2d`] for explicit or no padding.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let (rows, cols) = match conv.padding {
        PaddingConfig2d::Valid => ((0, 0), (0, 0)),
        PaddingConfig2d::Explicit(top, left, bottom, right) => ((top, bottom), (left, right)),
        PaddingConfig2d::Same => return conv.forward(x),
    };
    let options =
        ConvOptions::new_with_padding(conv.stride, [rows, cols], conv.dilation, conv.groups);
    conv2d(
        x,
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        options,
    )
}

/// `burn::tensor::module::conv2d`, through the CPU kernels where they apply (see
/// [`crate::cpu::set_kernels`]).
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !crate::cpu::kernels_enabled() {
        return burn_conv2d(x, weight, bias, options);
    }
    match flex::try_conv2d(&x, &weight, bias.as_ref(), &options) {
        Some(out) => out,
        None => burn_conv2d(x, weight, bias, options),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    /// The output of `conv`, then the gradients of `sum(conv(x) * r)` for x, weight and bias.
    fn grads(
        conv: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>,
        tensors: (&Tensor<4>, &Tensor<4>, Option<&Tensor<1>>, &Tensor<4>),
        options: &ConvOptions<2>,
    ) -> Vec<Vec<f32>> {
        let (x, w, b, r) = tensors;
        let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
        let b = b.map(|b| b.clone().require_grad());
        let out = conv(x.clone(), w.clone(), b.clone(), options.clone());
        assert_eq!(out.dims(), r.dims());
        let values = out.clone().try_into_vec_as::<f32>().unwrap();
        let g = (out * r.clone()).sum().backward();
        let mut all = vec![
            values,
            x.grad(&g).unwrap().try_into_vec_as::<f32>().unwrap(),
            w.grad(&g).unwrap().try_into_vec_as::<f32>().unwrap(),
        ];
        if let Some(b) = b {
            all.push(b.grad(&g).unwrap().try_into_vec_as::<f32>().unwrap());
        }
        all
    }

    fn case(
        batch: usize,
        cin: usize,
        cout: usize,
        hw: [usize; 2],
        k: usize,
        options: ConvOptions<2>,
        bias: bool,
    ) {
        let device = Device::flex().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([batch, cin, hw[0], hw[1]], normal, &device);
        let w = Tensor::<4>::random([cout, cin / options.groups, k, k], normal, &device);
        let b = bias.then(|| Tensor::<1>::random([cout], normal, &device));
        let shape = burn_conv2d(x.clone(), w.clone(), b.clone(), options.clone()).dims();
        let r = Tensor::<4>::random(shape, normal, &device);
        let taken = flex::try_conv2d(&x, &w, b.as_ref(), &options).is_some();
        assert_eq!(
            taken,
            options.groups == 1,
            "GEMM path taken for {options:?}"
        );
        let tensors = (&x, &w, b.as_ref(), &r);
        let ours = grads(conv2d, tensors, &options);
        let theirs = grads(burn_conv2d, tensors, &options);
        let what = format!("{options:?}");
        let names = ["output", "dx", "dw", "dbias"].map(|n| format!("{what} {n}"));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        crate::cpu::assert_all_close(&names, &ours, &theirs, 1e-5);
    }

    #[test]
    fn gradients_equal_burns_on_the_cpu_backend() {
        case(
            2,
            3,
            4,
            [9, 8],
            3,
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            true,
        );
        case(
            2,
            4,
            6,
            [10, 10],
            4,
            ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
            false,
        );
        let asymmetric = ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1);
        case(2, 3, 5, [8, 8], 3, asymmetric, true);
        case(
            2,
            5,
            2,
            [6, 7],
            1,
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
            true,
        );
    }

    #[test]
    fn gradients_through_winograd_equal_burns() {
        let samples = rayon::current_num_threads();
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let g = flex::geometry([samples, 16, 17, 20], [5, 16, 3, 3], &options);
        assert!(winograd::applies_forward(&g), "Winograd's case");
        case(samples, 16, 5, [17, 20], 3, options.clone(), true);
        case(samples, 3, 8, [16, 16], 3, options, false);
    }

    #[test]
    fn large_3x3_images_with_a_sample_per_thread_train_through_winograd() {
        let device = Device::flex().autodiff();
        let samples = rayon::current_num_threads();
        let x = Tensor::<4>::zeros([samples, 64, 128, 128], &device).require_grad();
        let w = Tensor::<4>::zeros([2, 64, 3, 3], &device).require_grad();
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let g = flex::geometry(x.dims(), w.dims(), &options);
        assert!(!g.fits() && winograd::applies(&g));
        assert!(flex::try_conv2d(&x, &w, None, &options).is_some());
    }

    #[test]
    fn tensors_without_autodiff_take_the_gemm_forward() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 2, 5, 5], &device);
        let w = Tensor::<4>::ones([3, 2, 3, 3], &device);
        let b = Tensor::<1>::from_floats([0.5, 1.0, 2.0], &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let out = flex::try_conv2d(&x, &w, Some(&b), &options).expect("GEMM path");
        let out = out.try_into_vec_as::<f32>().unwrap();
        // A corner sees 2 channels x 4 taps, the centre 2 x 9, plus each channel's bias.
        assert_eq!(
            (out[0], out[12], out[25 + 12], out[50]),
            (8.5, 18.5, 19.0, 10.0)
        );
    }

    #[test]
    fn large_images_outside_winograd_take_burns_path() {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::zeros([1, 128, 256, 256], &device);
        let w = Tensor::<4>::zeros([8, 128, 3, 3], &device);
        let options = ConvOptions::new([2, 2], [1, 1], [1, 1], 1);
        assert!(flex::try_conv2d(&x, &w, None, &options).is_none());
    }

    /// `try_conv2d` on plain Flex tensors against burn, for one image of `x` shape.
    fn forward_matches_burn(x: [usize; 4], cout: usize, options: ConvOptions<2>) {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random(x, normal, &device);
        let w = Tensor::<4>::random([cout, x.dims()[1], 3, 3], normal, &device);
        let ours = flex::try_conv2d(&x, &w, None, &options).expect("the GEMM forward");
        let theirs = burn_conv2d(x, w, None, options);
        let [ours, theirs] = [ours, theirs].map(|t| t.try_into_vec_as::<f32>().unwrap());
        crate::cpu::assert_all_close(&["output"], &[ours], &[theirs], 1e-4);
    }

    #[test]
    fn large_images_without_autodiff_take_the_gemm_forward_in_bands() {
        // 128 x 9 x 96 x 96 floats of im2col: more than one band.
        let options = ConvOptions::new([2, 2], [1, 1], [1, 1], 1);
        let g = flex::geometry([1, 128, 192, 192], [4, 128, 3, 3], &options);
        assert!(!g.fits() && !winograd::applies_forward(&g));
        forward_matches_burn([1, 128, 192, 192], 4, options);
    }

    #[test]
    fn one_large_image_without_autodiff_takes_winograd() {
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let g = flex::geometry([1, 128, 96, 96], [4, 128, 3, 3], &options);
        assert!(winograd::applies_forward(&g));
        forward_matches_burn([1, 128, 96, 96], 4, options);
    }

    #[test]
    fn other_cases_fall_back_to_burn() {
        // Two groups: burn's own operation, same values.
        case(
            2,
            4,
            4,
            [6, 6],
            3,
            ConvOptions::new([1, 1], [1, 1], [1, 1], 2),
            true,
        );
    }
}
