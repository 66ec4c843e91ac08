//! The quantizers and estimators of the last years against vector-quantize-pytorch 1.32
//! (`tools/fixtures/make_quantizer_fixtures.py`): finite scalar quantization (quantized
//! latents, code indices, the straight-through gradient through `tanh`, the implicit
//! codebook, and the VQGAN config's checks of levels, `embed_dim` and `n_embed`), the
//! rotation trick (values and gradients), SimVQ (values, loss, gradients to the latents and
//! to its linear map) and lookup-free quantization (values, indices, entropy and commitment
//! loss and gradients while training; signs in evaluation).

mod common;

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Expected, assert_close_to_max, fixtures_dir, ints, values};
use taming_model::config::{
    DdConfig, Estimator, FsqConfig, LfqConfig, QuantizerConfig, SimVqConfig, VectorQuantizerConfig,
    VqganConfig,
};
use taming_model::quantize::{
    FsqQuantizer, LfqQuantizer, QuantizeMode, SimVqQuantizer, VectorQuantizer,
};

#[test]
fn fsq_matches_vector_quantize_pytorch() {
    for (name, levels) in [("8555", vec![8, 5, 5, 5]), ("346", vec![3, 4, 6])] {
        let fixture = fixtures_dir().join(format!("quantizers/fsq_{name}.safetensors"));
        let expected = Expected::from_file(&fixture);
        let device = Device::flex().autodiff();
        let q = FsqQuantizer::new(&FsqConfig {
            levels: levels.clone(),
        });
        let z: Tensor<4> = expected.tensor("z", &device).require_grad();
        let out = q.forward(z.clone());
        let g: Tensor<4> = expected.tensor("g", &device);
        let grads = (out.z_q.clone() * g).sum().backward();
        let what = |t: &str| format!("fsq {levels:?} {t}");
        let (_, out_ref) = expected.f32s("out");
        assert_close_to_max(&what("output"), &values(out.z_q.clone()), &out_ref, 1e-6);
        let (_, idx_ref) = expected.i64s("indices");
        assert_eq!(ints(out.indices.clone()), idx_ref, "{}", what("indices"));
        let (_, grad_ref) = expected.f32s("grad");
        let grad = values(z.grad(&grads).unwrap());
        assert_close_to_max(&what("gradient"), &grad, &grad_ref, 1e-5);
        assert!(out.loss.into_scalar::<f32>() == 0.0, "no codebook loss");

        // Every index's code, and the codes the forward pass produced.
        let n = q.n_embed();
        let all = Tensor::<3, Int>::from_data(
            TensorData::new((0..n as i64).collect::<Vec<_>>(), [1, 1, n]),
            &device,
        );
        let codes = q.lookup(all).reshape([levels.len(), n]).transpose();
        let (_, codes_ref) = expected.f32s("codes");
        assert_close_to_max(&what("codebook"), &values(codes), &codes_ref, 1e-6);
        let again = q.lookup(out.indices);
        assert_close_to_max(&what("lookup"), &values(again), &out_ref, 1e-6);
    }
}

#[test]
fn a_vqgan_config_with_fsq_checks_its_levels() {
    let ddconfig = DdConfig {
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions: vec![],
        dropout: 0.0,
        resamp_with_conv: true,
        in_channels: 3,
        resolution: 16,
        z_channels: 4,
        double_z: false,
    };
    let config = |levels: Vec<usize>, n_embed: usize, embed_dim: usize| VqganConfig {
        ddconfig: ddconfig.clone(),
        n_embed,
        embed_dim,
        quantizer: QuantizerConfig::Fsq(FsqConfig { levels }),
    };
    let ok = config(vec![8, 5, 5, 5], 1000, 4).validate();
    assert!(ok.is_ok(), "{ok:?}");
    for (levels, n, d, key) in [
        (vec![8, 5, 5, 5], 1024, 4, "n_embed"),
        (vec![8, 5, 5, 5], 1000, 3, "embed_dim"),
        (vec![2, 5], 10, 2, "quantizer.levels"),
    ] {
        let err = config(levels, n, d).validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    // The model directory format carries the kind.
    let json = serde_json::to_string(&config(vec![8, 5, 5, 5], 1000, 4)).unwrap();
    assert!(json.contains(r#""kind":"fsq""#), "{json}");
    let back: VqganConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(
        back.quantizer,
        QuantizerConfig::Fsq(FsqConfig {
            levels: vec![8, 5, 5, 5]
        })
    );
}

#[test]
fn the_rotation_trick_matches_vector_quantize_pytorch() {
    let expected = Expected::from_file(&fixtures_dir().join("quantizers/rotation.safetensors"));
    let device = Device::flex().autodiff();
    let cfg = VectorQuantizerConfig {
        estimator: Estimator::Rotation,
        ..Default::default()
    };
    let codes: Tensor<2> = expected.tensor("codes", &device);
    let q = VectorQuantizer::new(10, 6, &cfg, &device).with_codebook(codes);
    let z: Tensor<4> = expected.tensor("z", &device).require_grad();
    let out = q.forward(z.clone());
    let (_, idx_ref) = expected.i64s("indices");
    assert_eq!(ints(out.indices.clone()), idx_ref, "nearest codes");
    let (_, out_ref) = expected.f32s("out");
    assert_close_to_max("rotated latents", &values(out.z_q.clone()), &out_ref, 1e-5);
    let g: Tensor<4> = expected.tensor("g", &device);
    let grads = (out.z_q * g).sum().backward();
    let (_, grad_ref) = expected.f32s("grad");
    assert_close_to_max(
        "gradient",
        &values(z.grad(&grads).unwrap()),
        &grad_ref,
        1e-5,
    );
    // Not the straight-through gradient (which would be `g` itself).
    let (_, g_ref) = expected.f32s("g");
    assert!(
        grad_ref
            .iter()
            .zip(&g_ref)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
}

#[test]
fn simvq_matches_vector_quantize_pytorch() {
    let expected = Expected::from_file(&fixtures_dir().join("quantizers/simvq.safetensors"));
    let device = Device::flex().autodiff();
    let mut q = SimVqQuantizer::new(10, 6, &SimVqConfig::default(), &device);
    let frozen: Tensor<2> = expected.tensor("frozen", &device);
    q.frozen_codebook = Param::from_tensor(frozen).set_require_grad(false);
    // burn's Linear holds the weight as [in, out], torch's as [out, in].
    let weight: Tensor<2> = expected.tensor("weight", &device);
    q.code_transform.weight = Param::from_tensor(weight.transpose().require_grad());
    let z: Tensor<4> = expected.tensor("z", &device).require_grad();
    let out = q.forward(z.clone());
    let (_, idx_ref) = expected.i64s("indices");
    assert_eq!(ints(out.indices.clone()), idx_ref, "nearest codes");
    let (_, out_ref) = expected.f32s("out");
    assert_close_to_max("quantized", &values(out.z_q.clone()), &out_ref, 1e-5);
    let loss = out.loss.clone().into_scalar::<f32>();
    let loss_ref = expected.scalar("loss");
    assert!(
        (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs(),
        "{loss} vs {loss_ref}"
    );
    let g: Tensor<4> = expected.tensor("g", &device);
    let grads = ((out.z_q * g).sum() + out.loss.sum()).backward();
    let (_, grad_ref) = expected.f32s("grad");
    assert_close_to_max(
        "gradient to z",
        &values(z.grad(&grads).unwrap()),
        &grad_ref,
        1e-5,
    );
    let grad_w = q.code_transform.weight.grad(&grads).unwrap().transpose();
    let (_, grad_w_ref) = expected.f32s("grad_w");
    assert_close_to_max("gradient to the map", &values(grad_w), &grad_w_ref, 1e-5);
}

#[test]
fn lfq_matches_vector_quantize_pytorch() {
    let expected = Expected::from_file(&fixtures_dir().join("quantizers/lfq.safetensors"));
    let device = Device::flex().autodiff();
    let q = LfqQuantizer::new(4, &LfqConfig::default());
    assert_eq!(q.n_embed(), 16);
    let z: Tensor<4> = expected.tensor("z", &device).require_grad();
    let training = QuantizeMode {
        training: true,
        temperature: 1.0,
        group: None,
    };
    let out = q.forward(z.clone(), training);
    let (_, idx_ref) = expected.i64s("indices");
    assert_eq!(ints(out.indices.clone()), idx_ref, "indices");
    let (_, out_ref) = expected.f32s("out");
    assert_close_to_max("output", &values(out.z_q.clone()), &out_ref, 1e-6);
    let loss = out.loss.clone().into_scalar::<f32>();
    let loss_ref = expected.scalar("loss");
    assert!(
        (loss - loss_ref).abs() <= 1e-4 * loss_ref.abs(),
        "{loss} vs {loss_ref}"
    );
    let g: Tensor<4> = expected.tensor("g", &device);
    let grads = ((out.z_q * g).sum() + out.loss.sum()).backward();
    let (_, grad_ref) = expected.f32s("grad");
    assert_close_to_max(
        "gradient",
        &values(z.grad(&grads).unwrap()),
        &grad_ref,
        1e-4,
    );

    let eval = q.forward(z.detach(), QuantizeMode::EVAL);
    let (_, eval_ref) = expected.f32s("out_eval");
    assert_eq!(values(eval.z_q), eval_ref, "signs in evaluation");
    assert_eq!(eval.loss.into_scalar::<f32>(), 0.0);
    let again = q.lookup(eval.indices);
    assert_eq!(values(again), eval_ref, "codes of the indices");
}
