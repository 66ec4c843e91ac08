//! Both training stages on a second device (`TAMING_TEST_DEVICE`: Mesa's lavapipe in CI, a
//! real GPU unchanged), against the CPU from the same weights and batches: stage 1 with
//! LPIPS and the discriminator on (which also checks taming-rs's CPU kernels against burn's
//! operations on another backend), its checkpoints moving between the devices both ways, and
//! stage 2's training steps and KV-cached greedy sampling. Skips with a printed line where the
//! build or the machine has no such device (`model/tests/common/device.rs`).
//!
//! Tolerances: the two sides share weights and inputs, so they differ only by float
//! summation order (Winograd and im2col convolutions against burn's kernels, reductions in
//! another order). The first step's losses agree to 1e-4 (relative); later steps, where
//! Adam's normalized updates amplify differences in gradients near zero, to 1e-3.

use std::time::Instant;

mod common;
#[path = "../../model/tests/common/device.rs"]
mod device;

use burn::module::Module;
use burn::tensor::Device;
use common::{assert_same, params};
use device::test_device;
use taming_dataloader::shards::list_split;
use taming_dataloader::{
    ImageBatch, LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader,
};
use taming_model::config::{QuantizerConfig, VqganConfig};
use taming_model::loss::{DiscriminatorConfig, LossConfig, LpipsConfig};
use taming_model::transformer::{Cond, Conditioning, Gpt, Sampling, sample_window};
use taming_tests::process::root;
use taming_worker::stage1::{Stage1Config, Stage1Trainer, StepReport};
use taming_worker::stage2::Stage2Trainer;
use taming_worker::stage2::data::CodeSample;
use taming_worker::stage2::trainer::DataPosition;

/// One device at a time: lavapipe shares the CI machine's two cores, and burn's random
/// generator is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Relative agreement of the first step's losses (same weights, same batch).
const FIRST_STEP: f64 = 1e-4;
/// Relative agreement of later steps' losses.
const LATER_STEPS: f64 = 1e-3;

/// A tiny VQGAN (32 channels, f2, attention at 16x16, 32 codes) with LPIPS (the 2-stage
/// fixture weights) and the discriminator on from the first step; batch 2 of 32x32 images.
fn stage1_config() -> Stage1Config {
    let fixtures = root().join("model/tests/fixtures/loss");
    Stage1Config {
        objective: Default::default(),
        model: VqganConfig {
            ddconfig: common::small_ddconfig(8, vec![16]),
            n_embed: 32,
            embed_dim: 8,
            quantizer: QuantizerConfig::default(),
        },
        loss: LossConfig {
            disc_start: 0,
            lpips: Some(LpipsConfig {
                vgg16: fixtures.join("vgg16_2stages.pth"),
                heads: fixtures.join("lpips_heads_2stages.pth"),
                stages: 2,
            }),
            discriminator: DiscriminatorConfig {
                in_channels: 3,
                ndf: 8,
                n_layers: 2,
            },
            ..LossConfig::default()
        },
        base_learning_rate: 1e-4,
        batch_size: 2,
        grad_accum: 1,
        grad_clip: None,
        flip: false,
        seed: 7,
        val_images: None,
        divergence: Default::default(),
        ema: None,
        eval: Default::default(),
    }
}

/// The first `n` training batches of 2 (no random crop or flip).
fn batches(n: usize) -> Vec<ImageBatch> {
    let shards = list_split(root().join("data/fashion-mnist"), "train").unwrap();
    let cfg = LoaderConfig {
        batch_size: 2,
        preprocess: Preprocess {
            size: 32,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig::default(),
        require_masks: false,
    };
    let mut loader = ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap();
    (0..n).map(|_| loader.next_batch().unwrap()).collect()
}

fn close(what: &str, cpu: f64, dev: f64, tol: f64) {
    let scale = cpu.abs().max(dev.abs()).max(1e-3);
    assert!(
        (cpu - dev).abs() <= tol * scale,
        "{what}: cpu {cpu} vs device {dev} (relative tolerance {tol})"
    );
}

/// The losses of two step reports agree to `tol`, and both took the same path.
fn same_step(step: usize, cpu: &StepReport, dev: &StepReport, tol: f64) {
    assert_eq!(cpu.step, dev.step);
    let (c, d) = (&cpu.generator, &dev.generator);
    let at = |what: &str| format!("step {step} {what}");
    close(&at("total"), c.total, d.total, tol);
    close(&at("l1"), c.l1, d.l1, tol);
    close(&at("lpips"), c.p_loss, d.p_loss, tol);
    close(&at("g_loss"), c.g_loss, d.g_loss, tol);
    close(&at("d_weight"), c.d_weight, d.d_weight, tol);
    close(&at("quant"), c.quant, d.quant, tol);
    let (cd, dd) = (cpu.d_loss.expect("disc trains"), dev.d_loss.expect("disc"));
    close(&at("d_loss"), cd, dd, tol);
    assert!(
        c.p_loss > 0.0 && c.d_weight > 0.0,
        "LPIPS and the GAN term are on"
    );
}

/// One step of `trainer` on `batch` (no accumulation: a report per batch).
fn train(trainer: Stage1Trainer, batch: &ImageBatch) -> (Stage1Trainer, StepReport) {
    let x = trainer.input(batch).unwrap();
    let (trainer, report) = trainer.train_batch(x, None).unwrap();
    (trainer, report.expect("a step per batch"))
}

/// The largest difference between two parameter sets, relative to each tensor's scale.
fn worst_relative(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((name, x), (other, y))| {
            assert_eq!(name, other);
            let scale = x.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            worst / scale
        })
        .fold(0.0, f32::max)
}

/// The largest absolute difference between two parameter sets.
fn worst_absolute(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Three steps of the same VQGAN from the same weights and batches on the CPU and on the
/// device; then each side's checkpoint resumed on the other, with their weights, optimizer
/// moments and codebook state, and one more step from each agreeing.
#[test]
fn stage1_steps_and_checkpoints_agree_between_the_cpu_and_the_device() {
    let Some(dev) = test_device("stage1 on the test device") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = Device::flex().autodiff();
    let gpu = dev.device.clone().autodiff();
    let data = batches(4);
    let tmp = tempfile::tempdir().unwrap();

    // The device starts from the CPU's initial weights: a step-0 checkpoint written on the CPU
    // and resumed on the device (the two backends draw different random numbers).
    let on_cpu = Stage1Trainer::new(stage1_config(), 1, &cpu).unwrap();
    let start = tmp.path().join("start");
    on_cpu
        .save_checkpoint(&start, LoaderState::default(), 1)
        .unwrap();
    let (on_dev, _) = Stage1Trainer::resume(&start, 1, &gpu).unwrap();
    assert_same(&params(on_cpu.model()), &params(on_dev.model()));
    assert_same(
        &params(on_cpu.discriminator()),
        &params(on_dev.discriminator()),
    );

    let (mut on_cpu, mut on_dev) = (on_cpu, on_dev);
    for (i, batch) in data[..3].iter().enumerate() {
        let started = Instant::now();
        let c;
        (on_cpu, c) = train(on_cpu, batch);
        let cpu_time = started.elapsed();
        let started = Instant::now();
        let d;
        (on_dev, d) = train(on_dev, batch);
        let dev_time = started.elapsed();
        // For BENCHMARKS.md (`-- --nocapture`); the first device step compiles its kernels.
        eprintln!(
            "stage-1 step {}: cpu {cpu_time:.2?}, {} {dev_time:.2?}",
            i + 1,
            dev.spec
        );
        let tol = if i == 0 { FIRST_STEP } else { LATER_STEPS };
        same_step(i + 1, &c, &d, tol);
    }
    // Adam moves a weight by at most about 1.6 x lr per step (bias-corrected, betas 0.5 and
    // 0.9), whatever its gradient: where a gradient is within rounding of zero the two sides
    // may step differently, never by more than that, on each side, at each step.
    let bound = 2.0 * 3.0 * 1.6 * on_cpu.learning_rate() as f32;
    let drift = worst_absolute(&params(on_cpu.model()), &params(on_dev.model()));
    assert!(
        drift <= bound,
        "weights after 3 steps differ by {drift} (> {bound})"
    );

    // Device -> CPU and CPU -> device, at step 3 (optimizer moments and all).
    let from_dev = tmp.path().join("from-device");
    let from_cpu = tmp.path().join("from-cpu");
    on_dev
        .save_checkpoint(&from_dev, LoaderState::default(), 1)
        .unwrap();
    on_cpu
        .save_checkpoint(&from_cpu, LoaderState::default(), 1)
        .unwrap();
    let (dev_on_cpu, _) = Stage1Trainer::resume(&from_dev, 1, &cpu).unwrap();
    let (cpu_on_dev, _) = Stage1Trainer::resume(&from_cpu, 1, &gpu).unwrap();
    assert_eq!((dev_on_cpu.step(), cpu_on_dev.step()), (3, 3));
    assert_same(&params(on_dev.model()), &params(dev_on_cpu.model()));
    assert_same(
        &params(on_dev.discriminator()),
        &params(dev_on_cpu.discriminator()),
    );
    assert_same(&params(on_cpu.model()), &params(cpu_on_dev.model()));

    // The resumed copies continue as the originals do: the same weights and moments on the
    // other backend take the same step (first-step tolerance: nothing has drifted yet).
    let batch = &data[3];
    let dev_step = train(on_dev, batch).1;
    let cpu_step = train(on_cpu, batch).1;
    same_step(4, &dev_step, &train(dev_on_cpu, batch).1, FIRST_STEP);
    same_step(4, &cpu_step, &train(cpu_on_dev, batch).1, FIRST_STEP);
}

/// A 2-layer class-conditional GPT over 8x8 grids of 64 codes.
fn stage2_samples(step: usize) -> Vec<CodeSample> {
    (0..4)
        .map(|i| CodeSample {
            codes: (0..64)
                .map(|t| ((step * 13 + i * 7 + t * t) % 64) as i64)
                .collect(),
            grid: [8, 8],
            label: Some(((step + i) % 10) as i64),
            cond: None,
        })
        .collect()
}

/// Three stage-2 steps from the same weights on both devices, then KV-cached greedy sampling
/// of one class per row from the same trained weights: the same tokens on both, and on the
/// device the same with the cache as without.
#[test]
fn stage2_steps_and_greedy_sampling_agree_between_the_cpu_and_the_device() {
    let Some(dev) = test_device("stage2 on the test device") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = Device::flex().autodiff();
    let gpu = dev.device.clone().autodiff();
    let cfg = common::small_stage2_config(4);
    let model = cfg.model(64, [8, 8], Conditioning::Class { n_classes: 10 });
    let tmp = tempfile::tempdir().unwrap();

    let mut on_cpu = Stage2Trainer::new(cfg, model, 1, 10, &cpu).unwrap();
    on_cpu
        .save_checkpoint(tmp.path(), DataPosition::default(), 1)
        .unwrap();
    let (mut on_dev, _) = Stage2Trainer::resume(tmp.path(), 1, 10, &gpu).unwrap();
    assert_same(&params(on_cpu.gpt()), &params(on_dev.gpt()));
    for step in 0..3 {
        let batch = stage2_samples(step);
        let started = Instant::now();
        let (trainer, c) = on_cpu.train_batch(&batch).unwrap();
        on_cpu = trainer;
        let c = c.expect("a step");
        let cpu_time = started.elapsed();
        let started = Instant::now();
        let (trainer, d) = on_dev.train_batch(&batch).unwrap();
        on_dev = trainer;
        let d = d.expect("a step");
        let dev_time = started.elapsed();
        eprintln!(
            "stage-2 step {}: cpu {cpu_time:.2?}, {} {dev_time:.2?}",
            step + 1,
            dev.spec
        );
        assert_eq!((c.step, c.lr), (d.step, d.lr));
        let tol = if step == 0 { FIRST_STEP } else { LATER_STEPS };
        close(
            &format!("stage-2 step {} loss", step + 1),
            c.loss,
            d.loss,
            tol,
        );
    }
    let drift = worst_relative(&params(on_cpu.gpt()), &params(on_dev.gpt()));
    assert!(drift < 1e-2, "weights after 3 steps differ by {drift}");

    // Sampling from the CPU's trained weights on both sides.
    let layout = on_cpu.layout();
    let conds: Vec<Vec<i64>> = (0..3)
        .map(|c| layout.cond_rows(&Cond::Class(c)).unwrap())
        .collect();
    let gpt_cpu = on_cpu.gpt().valid();
    let gpt_dev = gpt_cpu.clone().to_device(&dev.device);
    let greedy =
        |gpt: &Gpt, cached: bool| sample_window(gpt, layout, &conds, Sampling::GREEDY, 0, cached);
    let cpu_tokens = greedy(&gpt_cpu, true).unwrap();
    let dev_tokens = greedy(&gpt_dev, true).unwrap();
    assert_eq!(cpu_tokens.len(), 3);
    assert!(cpu_tokens.iter().all(|t| t.len() == 64));
    assert_eq!(cpu_tokens, dev_tokens, "greedy tokens, cpu vs device");
    assert_eq!(
        dev_tokens,
        greedy(&gpt_dev, false).unwrap(),
        "device: KV cache vs none"
    );
}
