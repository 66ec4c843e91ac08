//! Stage-1 training on the embedded Fashion-MNIST shards, through the real trainer, loader
//! and loss (LPIPS from the small fixture weights, discriminator switched on mid-run).

use std::path::PathBuf;

use burn::tensor::Device;
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_model::config::{DdConfig, QuantizerConfig, VqganConfig};
use taming_model::loss::{DiscriminatorConfig, LossConfig, LpipsConfig};
use taming_worker::stage1::{Stage1Config, Stage1Trainer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn small_config(disc_start: u64) -> Stage1Config {
    let fixtures = root().join("model/tests/fixtures/loss");
    Stage1Config {
        model: VqganConfig {
            ddconfig: DdConfig {
                ch: 32,
                out_ch: 3,
                ch_mult: vec![1, 2],
                num_res_blocks: 1,
                attn_resolutions: vec![16],
                dropout: 0.0,
                resamp_with_conv: true,
                in_channels: 3,
                resolution: 32,
                z_channels: 16,
                double_z: false,
            },
            n_embed: 64,
            embed_dim: 16,
            quantizer: QuantizerConfig::default(),
        },
        loss: LossConfig {
            disc_start,
            lpips: Some(LpipsConfig {
                vgg16: fixtures.join("vgg16_2stages.pth"),
                heads: fixtures.join("lpips_heads_2stages.pth"),
                stages: 2,
            }),
            discriminator: DiscriminatorConfig {
                in_channels: 3,
                ndf: 16,
                n_layers: 2,
            },
            ..LossConfig::default()
        },
        base_learning_rate: 1.25e-4,
        batch_size: 8,
        grad_accum: 1,
        grad_clip: None,
        flip: false,
        seed: 3,
    }
}

fn loader(split: &str, batch: usize, train: bool) -> ShardLoader {
    let shards = list_split(root().join("data/fashion-mnist"), split).unwrap();
    let cfg = LoaderConfig {
        batch_size: batch,
        preprocess: Preprocess {
            size: 32,
            random_crop: train,
            flip: false,
        },
        reader: ReaderConfig {
            seed: 3,
            shuffle_shards: train,
            ..ReaderConfig::default()
        },
    };
    ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap()
}

#[test]
fn short_run_cuts_validation_l1_by_at_least_30_percent() {
    let device = Device::flex().autodiff();
    let steps = 120;
    let mut trainer = Stage1Trainer::new(small_config(80), 1, &device).unwrap();
    assert!(
        (trainer.learning_rate() - 1e-3).abs() < 1e-12,
        "lr = base x batch x nodes x accum"
    );
    let val = loader("val", 64, false).next_in_epoch().unwrap().unwrap();
    let val = trainer.to_tensor(&val);
    let first = trainer.eval_l1(val.clone());
    let mut train = loader("train", 8, true);
    let mut last = None;
    for _ in 0..steps {
        let batch = train.next_batch().unwrap();
        let x = trainer.to_tensor(&batch);
        last = trainer.train_batch(x);
    }
    let report = last.expect("a step report");
    assert_eq!(report.step, steps);
    assert!(
        report.d_loss.is_some(),
        "discriminator trains after disc_start"
    );
    assert!(report.generator.d_weight > 0.0 && report.generator.disc_factor == 1.0);
    assert!(report.usage.unwrap() > 0.0);
    let end = trainer.eval_l1(val);
    assert!(
        end <= 0.7 * first,
        "validation L1 {first:.4} -> {end:.4}: not a 30% cut"
    );
}

#[test]
fn perceptual_weight_without_lpips_weights_is_refused_before_any_work() {
    let mut cfg = small_config(0);
    cfg.loss.lpips = None;
    let err = Stage1Trainer::new(cfg, 1, &Device::flex().autodiff())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("loss.lpips") && err.contains("perceptual_weight"),
        "{err}"
    );
}
