//! One full stage-1 training iteration (generator step + discriminator step), by default on
//! the CPU for the config of issue 3's benchmark: ch 64, ch_mult [1,2,2,4], 2 residual blocks,
//! attention at 8, z 64, 512 codes of dimension 64, 64x64 images, batch 4, LPIPS (full VGG16,
//! random weights) and the discriminator on.
//!
//! `cargo bench -p taming-worker --bench train_step -- [--iters N] [--json] [--burn-ops]
//! [--config FILE --batch B] [--device SPEC]`
//!
//! `--burn-ops` times burn's own convolution and GroupNorm instead of taming-rs's CPU kernels;
//! `--config` takes a stage-1 config's model and discriminator (e.g.
//! `configs/stage1/imagenet_f16_1024.yaml`, at its resolution) with batch `B`; `--device`
//! runs on `cuda:N` or `vulkan:N` (built with that feature).

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use taming_model::config::{DdConfig, QuantizerConfig, VqganConfig};
use taming_model::device::DeviceSpec;
use taming_model::loss::{DiscriminatorConfig, LossConfig, Lpips};
use taming_worker::stage1::{Stage1Config, Stage1Trainer};

fn config() -> Stage1Config {
    Stage1Config {
        objective: Default::default(),
        model: VqganConfig {
            ddconfig: DdConfig {
                ch: 64,
                out_ch: 3,
                ch_mult: vec![1, 2, 2, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![8],
                dropout: 0.0,
                resamp_with_conv: true,
                in_channels: 3,
                resolution: 64,
                z_channels: 64,
                double_z: false,
            },
            n_embed: 512,
            embed_dim: 64,
            quantizer: QuantizerConfig::default(),
        },
        loss: LossConfig {
            disc_start: 0,
            discriminator: DiscriminatorConfig::default(),
            ..LossConfig::default()
        },
        base_learning_rate: 4.5e-6,
        batch_size: 4,
        grad_accum: 1,
        grad_clip: None,
        flip: false,
        seed: 0,
        val_images: None,
        divergence: Default::default(),
        ema: None,
        eval: Default::default(),
    }
}

/// The value after `flag`, if given.
fn option<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    Some(
        args.get(i + 1)
            .unwrap_or_else(|| panic!("{flag} needs a value")),
    )
}

/// The benchmark's config, or a config file's model and discriminator at batch `batch`.
fn chosen_config(args: &[String]) -> Stage1Config {
    let Some(path) = option(args, "--config") else {
        return config();
    };
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let file: Stage1Config = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let batch = option(args, "--batch").map_or(file.batch_size, |b| b.parse().expect("batch"));
    let mut cfg = config();
    cfg.model = file.model;
    cfg.loss.discriminator = file.loss.discriminator;
    cfg.batch_size = batch;
    cfg
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = option(&args, "--iters").map_or(5, |s| s.parse().expect("iterations"));
    let json = args.iter().any(|a| a == "--json");
    let burn_ops = args.iter().any(|a| a == "--burn-ops");
    taming_kernels::cpu::set_kernels(!burn_ops);
    let spec: DeviceSpec = option(&args, "--device")
        .unwrap_or("cpu")
        .parse()
        .expect("--device cpu|cuda:N|vulkan:N");
    let name = match (burn_ops, spec) {
        (true, _) => "taming-rs (burn ops)".to_string(),
        (false, DeviceSpec::Cpu) => "taming-rs".to_string(),
        (false, spec) => format!("taming-rs on {spec}"),
    };
    let device = spec.device().expect("the device").autodiff();
    let cfg = chosen_config(&args);
    let (b, size) = (cfg.batch_size, cfg.model.ddconfig.resolution);
    let lpips = Lpips::new(5, &device).no_grad();
    let mut trainer =
        Stage1Trainer::with_lpips(cfg, 1, &device, Some(lpips)).expect("valid config");
    let x = Tensor::<4>::random(
        [b, 3, size, size],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let step = |t: Stage1Trainer| {
        let (t, report) = t.train_batch(x.clone(), None).expect("a step");
        let report = report.expect("one step per batch");
        assert!(report.d_loss.is_some(), "discriminator on");
        t
    };
    trainer = step(trainer); // warm-up
    let start = Instant::now();
    for _ in 0..iters {
        trainer = step(trainer);
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    if json {
        println!(
            "{{\"impl\": \"{name}\", \"seconds_per_iteration\": {secs:.4}, \"iters\": {iters}, \"batch\": {b}, \"size\": {size}}}"
        );
    } else {
        println!(
            "{name}: {secs:.3} s per training iteration (G + D), batch {b} at {size}x{size}, \
             {iters} iterations"
        );
    }
}
