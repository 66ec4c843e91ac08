//! Stage-1 training on the embedded Fashion-MNIST shards, through the real trainer, loader
//! and loss (LPIPS from the small fixture weights, discriminator switched on mid-run).

mod common;

use std::path::Path;

use burn::tensor::Device;
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_model::config::{
    FsqConfig, LfqConfig, QuantizerConfig, RestartConfig, SimVqConfig, VectorQuantizerConfig,
    VqganConfig,
};
use taming_model::loss::{DiscriminatorConfig, LossConfig, LpipsConfig};
use taming_tests::process::root;
use taming_worker::engine::train;
use taming_worker::settings::RunSettings;
use taming_worker::stage1::{Stage1Config, Stage1Trainer};

fn small_config(disc_start: u64) -> Stage1Config {
    let fixtures = root().join("model/tests/fixtures/loss");
    Stage1Config {
        objective: Default::default(),
        model: VqganConfig {
            ddconfig: common::small_ddconfig(16, vec![16]),
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
        val_images: Some(16),
        divergence: Default::default(),
        ema: None,
        eval: Default::default(),
    }
}

fn loader(split: &str, batch: usize, train: bool) -> ShardLoader {
    let shards = list_split(root().join("data/fashion-mnist"), split).unwrap();
    ShardLoader::open(
        &shards,
        loader_config(batch, train),
        &LoaderState::default(),
    )
    .unwrap()
}

fn loader_config(batch: usize, train: bool) -> LoaderConfig {
    LoaderConfig {
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
        require_masks: false,
    }
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
        let (next, report) = trainer.train_batch(x, None).unwrap();
        trainer = next;
        last = report;
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

/// The cond stage of segmentation conditioning: `configs/stage1/fashion_mnist_seg.yaml`
/// (made smaller) learns the embedded silhouette maps with BCE + the quantizer loss.
#[test]
fn segmentation_objective_learns_the_silhouette_maps() {
    use taming_worker::stage1::{Objective, VqganPlan};
    let text =
        std::fs::read_to_string(root().join("configs/stage1/fashion_mnist_seg.yaml")).unwrap();
    let mut cfg = taming_worker::defaults::parse_config(&text, "seg.yaml").unwrap();
    assert_eq!(cfg.objective, Objective::Segmentation);
    assert!(
        cfg.needs_label_maps(),
        "samples without a map are skipped, not fatal"
    );
    cfg.model.ddconfig.ch_mult = vec![1, 2];
    cfg.model.ddconfig.attn_resolutions = vec![16];
    cfg.batch_size = 8;
    cfg.base_learning_rate = 1.25e-4;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seg");
    let data = root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned();
    let mut run = RunSettings::single(out.clone(), 30, Device::flex().autodiff());
    run.eval_every = 10;
    let s = train(VqganPlan::new(cfg.clone(), data), run, None, false).unwrap();
    assert!(
        s.last_val < 0.6 * s.first_val,
        "map L1 {} -> {}",
        s.first_val,
        s.last_val
    );
    assert!(out.join("val_grid.png").is_file());
    let (model_cfg, _) =
        taming_model::checkpoint::native::load_model(&out.join("model"), &Device::flex()).unwrap();
    assert_eq!(model_cfg.ddconfig.in_channels, 11);

    // A batch without label maps is refused, naming the sample.
    let trainer = Stage1Trainer::with_lpips(cfg, 1, &Device::flex().autodiff(), None).unwrap();
    let mut batch = loader("val", 2, false).next_batch().unwrap();
    assert!(trainer.input(&batch).is_ok());
    batch.masks = None;
    let err = trainer.input(&batch).unwrap_err().to_string();
    assert!(
        err.contains("val000000") && err.contains(".seg.png"),
        "{err}"
    );
}

/// `loss.disc_conditional`: the discriminator sees each image with its one-hot label map
/// (11 silhouette labels, so 3 + 11 input channels) from the first step on.
#[test]
fn conditional_discriminator_trains_on_images_with_their_label_maps() {
    use taming_worker::stage1::VqganPlan;
    let mut cfg = small_config(0);
    assert!(!cfg.needs_label_maps());
    cfg.loss.disc_conditional = true;
    assert!(cfg.needs_label_maps());
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("loss.discriminator.in_channels"), "{err}");
    cfg.loss.discriminator.in_channels = 3 + 11;
    cfg.validate().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cond");
    let data = root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned();
    let mut run = RunSettings::single(out.clone(), 3, Device::flex().autodiff());
    run.eval_every = 3;
    run.checkpoint_every = 3;
    train(VqganPlan::new(cfg.clone(), data), run, None, false).unwrap();
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let d_losses: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(7).unwrap().parse().unwrap())
        .collect();
    assert_eq!(d_losses.len(), 3);
    assert!(
        d_losses.iter().all(|d| d.is_finite() && *d > 0.0),
        "{d_losses:?}"
    );

    // Labels beyond the condition's channels, and batches without maps, are refused by name.
    let trainer = Stage1Trainer::with_lpips(cfg.clone(), 1, &Device::flex().autodiff(), None);
    let trainer = trainer.unwrap();
    let mut batch = loader("val", 2, false).next_batch().unwrap();
    assert_eq!(trainer.condition(&batch).unwrap().unwrap().dims()[1], 11);
    batch.masks = None;
    let err = trainer.condition(&batch).unwrap_err().to_string();
    assert!(
        err.contains("conditional discriminator") && err.contains("val000000"),
        "{err}"
    );
    cfg.loss.discriminator.in_channels = 3 + 4;
    let small = Stage1Trainer::with_lpips(cfg, 1, &Device::flex().autodiff(), None).unwrap();
    let batch = loader("val", 16, false).next_batch().unwrap();
    assert!(
        small.condition(&batch).is_err(),
        "labels up to 10 need 11 channels"
    );
}

/// A training shard where every other sample lacks its label map: with the conditional
/// discriminator those samples are skipped, and the run trains on the rest (before, one such
/// sample dropped the maps of its whole batch and failed the run).
#[test]
fn samples_without_a_label_map_are_skipped_where_training_needs_maps() {
    use taming_worker::stage1::VqganPlan;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let embedded = root().join("data/fashion-mnist");
    std::fs::copy(embedded.join("val-000000.tar"), data.join("val-000000.tar")).unwrap();
    let mut source =
        tar::Archive::new(std::fs::File::open(embedded.join("train-000000.tar")).unwrap());
    let mut shard =
        tar::Builder::new(std::fs::File::create(data.join("train-000000.tar")).unwrap());
    for entry in source.entries().unwrap().take(3 * 40) {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let index: u32 = name["train".len()..name.find('.').unwrap()]
            .parse()
            .unwrap();
        if name.ends_with(".seg.png") && index % 2 == 1 {
            continue;
        }
        let mut header = entry.header().clone();
        shard.append_data(&mut header, &name, &mut entry).unwrap();
    }
    shard.finish().unwrap();

    let mut cfg = small_config(0);
    cfg.loss.disc_conditional = true;
    cfg.loss.discriminator.in_channels = 3 + 11;
    let out = tmp.path().join("run");
    let data = data.to_string_lossy().into_owned();
    let mut run = RunSettings::single(out, 2, Device::flex().autodiff());
    run.eval_every = 2;
    run.checkpoint_every = 2;
    let s = train(VqganPlan::new(cfg, data.clone()), run, None, false).unwrap();
    assert_eq!(s.steps, 2);
    // Half the samples lack maps: some were skipped and counted on the way to 16 with maps.
    assert!(s.skipped > 0 && s.skipped <= 20, "skipped {}", s.skipped);
    // The loader the run reads with hands out only samples with maps, and counts the rest.
    let shards = list_split(&data, "train").unwrap();
    let cfg = LoaderConfig {
        require_masks: true,
        ..loader_config(8, false)
    };
    let mut reader = ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap();
    let mut seen = 0;
    while let Some(batch) = reader.next_in_epoch().unwrap() {
        let masks = batch.masks.as_ref().expect("maps with every batch");
        assert_eq!(masks.len(), batch.keys.len() * 32 * 32);
        for key in &batch.keys {
            let index: u32 = key["train".len()..].parse().unwrap();
            assert_eq!(index % 2, 0, "{key} has no map and was not skipped");
        }
        seen += batch.keys.len();
    }
    // 40 samples (three members each): the 20 odd ones lack their map.
    assert_eq!(reader.skipped(), 20, "every sample without a map");
    assert!(seen >= 16, "{seen} samples with maps handed out");
}

/// `configs/stage1/photo_crops.yaml` trains on the embedded photo crops (64x64 JPEG) through
/// the whole run: a few steps, a checkpoint and the model export.
#[test]
fn the_photo_crop_default_trains_end_to_end() {
    use taming_worker::stage1::VqganPlan;
    let text = std::fs::read_to_string(root().join("configs/stage1/photo_crops.yaml")).unwrap();
    let cfg = taming_worker::defaults::parse_config(&text, "photo_crops.yaml").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("photos");
    let data = root()
        .join("data/photo-crops")
        .to_string_lossy()
        .into_owned();
    let mut run = RunSettings::single(out.clone(), 2, Device::flex().autodiff());
    run.eval_every = 2;
    let s = train(VqganPlan::new(cfg, data.clone()), run, None, false).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.first_val.is_finite() && s.last_val.is_finite());
    assert!(out.join("model/model.safetensors").is_file());
    assert_grid_shows_the_validation_images(&out.join("val_grid.png"), &data, 16, 64);
}

/// The mean and largest difference of two images' bytes, in levels.
fn level_difference(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    let d: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
    (mean, d.into_iter().max().unwrap_or(0))
}

/// `val_grid.png` holds, four pairs a row, the first `n` validation images (decoded here from
/// the shard, independently of the loader, by another JPEG decoder: within half a level on
/// average and 8 levels at most) on the left of each pair, and on the right a reconstruction:
/// an image of its own (not the input, not the background).
fn assert_grid_shows_the_validation_images(grid: &Path, data: &str, n: usize, size: u32) {
    let grid = image::open(grid).unwrap().into_rgb8();
    let (gap, per_row) = (2, 4);
    let rows = (n as u32).div_ceil(per_row);
    assert_eq!(
        grid.dimensions(),
        (per_row * (2 * size + 3 * gap), rows * (size + gap))
    );
    let shard = std::fs::File::open(Path::new(data).join("val-000000.tar")).unwrap();
    let mut archive = tar::Archive::new(shard);
    let images: Vec<image::RgbImage> = archive
        .entries()
        .unwrap()
        .take(n)
        .map(|e| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e.unwrap(), &mut bytes).unwrap();
            image::load_from_memory(&bytes).unwrap().into_rgb8()
        })
        .collect();
    for (i, want) in images.iter().enumerate() {
        let (col, row) = (i as u32 % per_row, i as u32 / per_row);
        let (x, y) = (col * (2 * size + 3 * gap), row * (size + gap));
        let tile = |x0: u32| image::imageops::crop_imm(&grid, x0, y, size, size).to_image();
        let (mean, max) = level_difference(&tile(x), want);
        assert!(
            mean <= 0.5 && max <= 8,
            "image {i} is not on the left of pair {i} (mean {mean:.3}, max {max} levels apart)"
        );
        let rec = tile(x + size + gap);
        let white = image::RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
        assert!(
            level_difference(&rec, want).0 > 2.0 && rec != white,
            "pair {i} has no reconstruction"
        );
    }
}

/// Dead-code restart through the trainer with codebooks 1x, 2x and 64x the batch's latents
/// (one 32x32 image: 16x16 = 256 latents): each step trains and restarts the unused codes.
#[test]
fn dead_code_restart_trains_with_codebooks_larger_than_the_batch() {
    let device = Device::flex().autodiff();
    let latents = 16 * 16;
    for factor in [1, 2, 64] {
        let mut config = small_config(1000);
        config.batch_size = 1;
        config.loss.perceptual_weight = 0.0;
        config.loss.lpips = None;
        config.model.n_embed = factor * latents;
        config.model.quantizer = QuantizerConfig::Vector(VectorQuantizerConfig {
            dead_code_restart: Some(RestartConfig {
                threshold: 0.9,
                decay: 0.5,
            }),
            ..Default::default()
        });
        let mut trainer = Stage1Trainer::new(config, 1, &device).unwrap();
        let mut train = loader("train", 1, true);
        for step in 1..=2 {
            let x = trainer.to_tensor(&train.next_batch().unwrap());
            let (next, report) = trainer.train_batch(x, None).unwrap();
            trainer = next;
            let report = report.expect("a step report");
            assert_eq!(report.step, step);
            assert!(
                report.restarted > 0,
                "{factor}x: unused codes restart at step {step}"
            );
        }
    }
}

/// A micro-batch whose loss is not finite skips its step: no parameter changes, the step is
/// counted as skipped, and the next finite batch trains as usual.
#[test]
fn a_non_finite_loss_skips_the_step_and_training_goes_on() {
    let device = Device::flex().autodiff();
    let trainer = Stage1Trainer::new(small_config(0), 1, &device).unwrap();
    let mut train = loader("train", 4, true);
    let x = trainer.to_tensor(&train.next_batch().unwrap());
    let flat = |t: &Stage1Trainer| -> Vec<f32> {
        use burn::module::{Module, ModuleVisitor, Param};
        struct Grab<'a>(&'a mut Vec<f32>);
        impl ModuleVisitor for Grab<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<burn::Tensor<D>>) {
                self.0
                    .extend(p.val().into_data().try_to_vec::<f32>().unwrap());
            }
        }
        let mut v = Vec::new();
        t.model().visit(&mut Grab(&mut v));
        t.discriminator().visit(&mut Grab(&mut v));
        v
    };
    let start = flat(&trainer);
    let (trainer, report) = trainer
        .train_batch(x.clone().mul_scalar(f32::NAN), None)
        .unwrap();
    let report = report.expect("a step report");
    assert!(report.skipped && report.skipped_total == 1, "{report:?}");
    assert_eq!(report.step, 1);
    assert!(flat(&trainer) == start, "nothing changed");
    let (trainer, report) = trainer.train_batch(x, None).unwrap();
    let report = report.expect("a step report");
    assert!(!report.skipped && report.skipped_total == 1, "{report:?}");
    assert!(report.generator.total.is_finite() && report.d_loss.is_some());
    assert!(flat(&trainer) != start, "a finite step trains");
}

/// FSQ, SimVQ and LFQ in the same trainer: the runs learn, and report usage and perplexity
/// as the vector quantizer's runs do (FSQ has no codebook loss).
#[test]
fn fsq_simvq_and_lfq_train_and_report_usage_like_the_vector_quantizer() {
    let device = Device::flex().autodiff();
    let fsq = QuantizerConfig::Fsq(FsqConfig {
        levels: vec![5, 5, 5],
    });
    let simvq = QuantizerConfig::Simvq(SimVqConfig::default());
    let lfq = QuantizerConfig::Lfq(LfqConfig::default());
    for (quantizer, n_embed, embed_dim) in [(fsq, 125, 3), (simvq, 64, 16), (lfq, 64, 6)] {
        let mut cfg = small_config(1000);
        cfg.model.embed_dim = embed_dim;
        cfg.model.n_embed = n_embed;
        cfg.model.quantizer = quantizer.clone();
        let mut trainer = Stage1Trainer::new(cfg, 1, &device).unwrap();
        let val = loader("val", 64, false).next_in_epoch().unwrap().unwrap();
        let val = trainer.to_tensor(&val);
        let first = trainer.eval_l1(val.clone());
        let mut train = loader("train", 8, true);
        let mut last = None;
        for _ in 0..60 {
            let x = trainer.to_tensor(&train.next_batch().unwrap());
            let (next, report) = trainer.train_batch(x, None).unwrap();
            trainer = next;
            last = report;
        }
        let report = last.expect("a step report");
        if matches!(quantizer, QuantizerConfig::Fsq(_)) {
            assert_eq!(report.generator.quant, 0.0, "FSQ has no codebook loss");
        }
        let usage = report.usage.expect("usage reported");
        assert!(usage > 0.05 && usage <= 1.0, "{quantizer:?}: usage {usage}");
        assert!(report.perplexity > 1.0, "perplexity {}", report.perplexity);
        let end = trainer.eval_l1(val);
        assert!(
            end <= 0.8 * first,
            "{quantizer:?}: validation L1 {first:.4} -> {end:.4}"
        );
    }
}
