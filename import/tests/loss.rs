//! The stage-1 loss pieces against fixtures made by tools/fixtures/make_loss_fixtures.py with
//! the `lpips` package and taming-transformers 0.0.1.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use common::{Expected, assert_close_l2, assert_close_to_max, rel, values};
use taming_import::fill_from_torch;
use taming_model::loss::discriminator::reference_name;
use taming_model::loss::{
    DiscLoss, DiscriminatorConfig, GeneratorInputs, LastLayer, LeCamAnchors, LossConfig,
    LpipsConfig, NLayerDiscriminator, VqLoss,
};

fn dir() -> PathBuf {
    common::fixtures_dir().join("loss")
}

fn fixture() -> Expected {
    Expected::from_file(&dir().join("expected.safetensors"))
}

fn lpips_config() -> LpipsConfig {
    LpipsConfig {
        vgg16: dir().join("vgg16_2stages.pth"),
        heads: dir().join("lpips_heads_2stages.pth"),
        stages: 2,
    }
}

fn discriminator(device: &Device) -> NLayerDiscriminator {
    discriminator_from(device, "discriminator.pth", 3)
}

fn discriminator_from(device: &Device, file: &str, in_channels: usize) -> NLayerDiscriminator {
    let cfg = DiscriminatorConfig {
        in_channels,
        ndf: 8,
        n_layers: 3,
    };
    let mut disc = NLayerDiscriminator::new(&cfg, device);
    let left = fill_from_torch(&mut disc, &dir().join(file), reference_name).unwrap();
    assert!(
        left.keys().all(|k| k.ends_with("num_batches_tracked")),
        "unused: {:?}",
        left.keys()
    );
    disc
}

#[test]
fn lpips_matches_the_lpips_package() {
    let device = Device::flex();
    let fx = fixture();
    let lpips = taming_import::load_lpips(&lpips_config(), &device).unwrap();
    let d = values(lpips.forward(fx.tensor("x", &device), fx.tensor("degraded", &device)));
    let expected = fx.f32s("lpips").1;
    for (a, b) in d.iter().zip(&expected) {
        assert!(rel(*a, *b) < 1e-4, "lpips {a} vs {b}");
    }
    let same = values(lpips.forward(fx.tensor("x", &device), fx.tensor("x", &device)));
    assert!(
        same.iter().all(|v| v.abs() < 1e-6),
        "identical images are at distance 0: {same:?}"
    );
}

#[test]
fn lpips_file_that_does_not_fit_names_the_tensor() {
    let device = Device::flex();
    let cfg = LpipsConfig {
        stages: 3,
        ..lpips_config()
    };
    let err = taming_import::load_lpips(&cfg, &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("features.10.weight") && err.contains("vgg16_2stages.pth"),
        "{err}"
    );
}

#[test]
fn discriminator_matches_reference_in_training_and_eval_mode() {
    let device = Device::flex().autodiff();
    let fx = fixture();
    let disc = discriminator(&device);
    let real = disc.forward(fx.tensor("x", &device));
    assert_close_to_max(
        "D(x) train",
        &values(real),
        &fx.f32s("disc_real_train").1,
        1e-4,
    );
    let fake = disc.forward(fx.tensor("degraded", &device));
    assert_close_to_max(
        "D(rec) train",
        &values(fake),
        &fx.f32s("disc_fake_train").1,
        1e-4,
    );
    let (mean, var) = disc.running_stats(0);
    assert_close_to_max(
        "running mean",
        &values(mean),
        &fx.f32s("disc_running_mean_3").1,
        1e-5,
    );
    assert_close_to_max(
        "running var",
        &values(var),
        &fx.f32s("disc_running_var_3").1,
        1e-5,
    );
    let eval =
        burn::module::Module::valid(&disc).forward(fx.tensor("degraded", &device.clone().inner()));
    // Eval mode divides by the running deviation, small after two updates: f32 rounding of
    // the statistics shows at ~1e-4 of the (small) logits.
    assert_close_to_max(
        "D(rec) eval",
        &values(eval),
        &fx.f32s("disc_fake_eval").1,
        3e-4,
    );
}

fn loss_case(tag: &str, kind: DiscLoss, step: u64) {
    loss_case_with(tag, kind, step, false)
}

/// One generator and one discriminator step against the reference's; `conditional`: the
/// discriminator sees the fixture's two-channel condition too.
fn loss_case_with(tag: &str, kind: DiscLoss, step: u64, conditional: bool) {
    let device = Device::flex().autodiff();
    let fx = fixture();
    let in_channels = if conditional { 5 } else { 3 };
    let config = LossConfig {
        disc_start: 10,
        disc_loss: kind,
        disc_conditional: conditional,
        lpips: Some(lpips_config()),
        discriminator: DiscriminatorConfig {
            in_channels,
            ndf: 8,
            n_layers: 3,
        },
        ..LossConfig::default()
    };
    let loss = VqLoss::new(
        config,
        Some(taming_import::load_lpips(&lpips_config(), &device).unwrap()),
    );
    let (disc, cond) = if conditional {
        let disc = discriminator_from(&device, "discriminator_cond.pth", in_channels);
        (disc, Some(fx.tensor::<4>("cond", &device)))
    } else {
        (discriminator(&device), None)
    };
    let h: Tensor<4> = fx.tensor::<4>("rec_in", &device).require_grad();
    let w: Tensor<4> = fx.tensor::<4>("last_w", &device).require_grad();
    let b: Tensor<1> = fx.tensor("last_b", &device);
    let rec = conv2d(
        h.clone(),
        w.clone(),
        Some(b),
        ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
    );
    let quant = Tensor::<1>::from_data(TensorData::new(vec![0.125f32], [1]), &device);
    let x: Tensor<4> = fx.tensor("x", &device);
    let last = LastLayer {
        input: h.clone(),
        weight: w.clone(),
    };
    let inputs = GeneratorInputs {
        x: x.clone(),
        rec: rec.clone(),
        quant,
        last: &last,
        cond: cond.as_ref(),
    };
    let step_out = loss.generator(&disc, inputs, step);
    let log = step_out.log;
    let check = |name: &str, ours: f64, tol: f32| {
        let want = fx.scalar(&format!("{tag}/{name}"));
        assert!(
            rel(ours as f32, want) <= tol,
            "{tag} {name}: {ours} vs reference {want}"
        );
    };
    check("g_total", log.total, 1e-4);
    check("nll_loss", log.nll, 1e-5);
    check("p_loss", log.p_loss, 1e-4);
    check("disc_factor", log.disc_factor, 0.0);
    if log.disc_factor > 0.0 {
        check("g_loss", log.g_loss, 1e-4);
        check("d_weight", log.d_weight, 1e-3);
    }
    let grads = step_out.surrogate.backward();
    assert_close_to_max(
        "grad W",
        &values(w.grad(&grads).unwrap()),
        &fx.f32s(&format!("{tag}/grad_last_w")).1,
        1e-3,
    );
    // Through LPIPS's ReLUs and max pools, one pixel may differ (see assert_close_l2): with
    // the CPU kernels' summation order one pixel of these fixtures does, 1.3e-3 of the norm.
    assert_close_l2(
        "grad h",
        &values(h.grad(&grads).unwrap()),
        &fx.f32s(&format!("{tag}/grad_rec_in")).1,
        5e-3,
    );
    let anchors = LeCamAnchors::default();
    match loss.discriminator(&disc, (x, rec), step, cond.as_ref(), anchors) {
        Some((d_loss, real, fake)) => {
            check("d_loss", values(d_loss)[0] as f64, 1e-4);
            check("logits_real", real, 1e-4);
            check("logits_fake", fake, 1e-4);
        }
        None => assert_eq!(
            fx.scalar(&format!("{tag}/d_loss")),
            0.0,
            "no discriminator loss before disc_start"
        ),
    }
}

#[test]
fn hinge_loss_with_adaptive_weight_matches_reference() {
    loss_case("hinge_on", DiscLoss::Hinge, 20);
}

#[test]
fn vanilla_loss_with_adaptive_weight_matches_reference() {
    loss_case("vanilla_on", DiscLoss::Vanilla, 20);
}

#[test]
fn conditional_discriminator_sees_the_condition_as_in_the_reference() {
    loss_case_with("hinge_cond", DiscLoss::Hinge, 20, true);
}

#[test]
fn before_disc_start_only_reconstruction_and_codebook_terms_count() {
    loss_case("hinge_off", DiscLoss::Hinge, 5);
}
