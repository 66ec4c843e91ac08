//! The convolutions of issue 3's training benchmark one at a time: burn Flex's forward and
//! backward against taming-rs's GEMM kernels (`taming_kernels::conv::kernels`), same inputs.
//!
//! `cargo bench -p taming-kernels --bench conv -- [--reps N]`

use std::time::Instant;

use burn::tensor::ops::ConvOptions;
use burn_backend::ops::ModuleOps;
use burn_backend::{DType, TensorMetadata};
use burn_flex::{Flex, FlexTensor, Layout};
use burn_std::{Bytes, Shape};
use taming_kernels::conv::kernels::{self, Geometry};
use taming_kernels::conv::winograd;

/// (what, batch, cin, cout, size, kernel, stride, padding before, padding after)
type Case = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CASES: [Case; 12] = [
    ("vqgan 3->64 @64", 4, 3, 64, 64, 3, 1, 1, 1),
    ("vqgan 64->64 @64", 4, 64, 64, 64, 3, 1, 1, 1),
    ("vqgan down 64 @64", 4, 64, 64, 64, 3, 2, 0, 1),
    ("vqgan 128->128 @32", 4, 128, 128, 32, 3, 1, 1, 1),
    ("vqgan 256->256 @8", 4, 256, 256, 8, 3, 1, 1, 1),
    ("vqgan 1x1 256 @8", 4, 256, 256, 8, 1, 1, 0, 0),
    ("lpips 64->64 @64", 8, 64, 64, 64, 3, 1, 1, 1),
    ("lpips 128->128 @32", 8, 128, 128, 32, 3, 1, 1, 1),
    ("lpips 256->256 @16", 8, 256, 256, 16, 3, 1, 1, 1),
    ("lpips 512->512 @8", 8, 512, 512, 8, 3, 1, 1, 1),
    ("disc 64->128 k4s2 @32", 4, 64, 128, 32, 4, 2, 1, 1),
    ("disc 256->512 k4 @8", 4, 256, 512, 8, 4, 1, 1, 1),
];

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn flex(values: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(Shape::from(dims.to_vec())),
        DType::F32,
    )
}

fn millis(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map_or(3, |s| s.parse().expect("repetitions"));
    println!(
        "| convolution | burn forward | GEMM forward | Winograd forward | burn backward | GEMM backward | Winograd backward |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let (mut burn_total, mut gemm_total) = ([0.0; 2], [0.0; 2]);
    for (name, batch, cin, cout, size, k, stride, before, after) in CASES {
        let g = Geometry {
            batch,
            cin,
            input: [size, size],
            cout,
            kernel: [k, k],
            stride: [stride; 2],
            padding: [(before, after); 2],
            dilation: [1, 1],
        };
        let [ho, wo] = g.output();
        let x = values(batch * cin * size * size, 1);
        let w = values(cout * cin * k * k, 2);
        let go = values(batch * cout * ho * wo, 3);
        let (xt, wt) = (
            flex(x.clone(), &[batch, cin, size, size]),
            flex(w.clone(), &[cout, cin, k, k]),
        );
        let got = flex(go.clone(), &[batch, cout, ho, wo]);
        let options = ConvOptions::new_with_padding([stride; 2], [(before, after); 2], [1, 1], 1);
        let burn_fwd = millis(reps, || {
            let out = Flex::conv2d(xt.clone(), wt.clone(), None, options.clone());
            assert_eq!(out.shape().dims::<4>(), [batch, cout, ho, wo]);
        });
        let gemm_fwd = millis(reps, || drop(kernels::forward(&g, &x, &w, None)));
        let burn_bwd = millis(reps, || {
            let dx = Flex::conv2d_x_backward(xt.clone(), wt.clone(), got.clone(), options.clone());
            let dw =
                Flex::conv2d_weight_backward(xt.clone(), wt.clone(), got.clone(), options.clone());
            assert_eq!(
                dx.shape().num_elements() + dw.shape().num_elements(),
                x.len() + w.len()
            );
        });
        let gemm_bwd = millis(reps, || {
            drop(kernels::input_grad(&g, &w, &go));
            drop(kernels::weight_grad(&g, &x, &go));
        });
        let wino = winograd::applies(&g).then(|| {
            let fwd = millis(reps, || drop(winograd::forward(&g, &x, &w, None)));
            let bwd = millis(reps, || {
                drop(winograd::backward(&g, &x, &w, &go, [true, true]))
            });
            (fwd, bwd)
        });
        let show = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1} ms"));
        burn_total[0] += burn_fwd;
        burn_total[1] += burn_bwd;
        gemm_total[0] += gemm_fwd;
        gemm_total[1] += gemm_bwd;
        println!(
            "| {name} | {burn_fwd:.1} ms | {gemm_fwd:.1} ms | {} | {burn_bwd:.1} ms | {gemm_bwd:.1} ms | {} |",
            show(wino.map(|w| w.0)),
            show(wino.map(|w| w.1)),
        );
    }
    println!(
        "| all | {:.1} ms | {:.1} ms | | {:.1} ms | {:.1} ms | |",
        burn_total[0], gemm_total[0], burn_total[1], gemm_total[1]
    );
}
