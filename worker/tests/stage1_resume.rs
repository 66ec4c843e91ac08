//! Checkpoints: resuming continues exactly as an uninterrupted run, and an interrupted write
//! leaves the previous checkpoint intact and loadable.

mod common;

use burn::tensor::Device;
use common::{assert_same, exported_params, params};
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_model::config::{QuantizerConfig, RestartConfig, VectorQuantizerConfig, VqganConfig};
use taming_model::loss::{DiscriminatorConfig, LossConfig};
use taming_tests::process::root;
use taming_worker::checkpoint::{self, CheckpointError};
use taming_worker::engine::{StepHook, train};
use taming_worker::learner::EmaConfig;
use taming_worker::settings::RunSettings;
use taming_worker::stage1::{Stage1Config, Stage1State, Stage1Trainer, VqganPlan};

/// burn seeds one process-wide generator: tests that train must not interleave their draws.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config() -> Stage1Config {
    Stage1Config {
        objective: Default::default(),
        model: VqganConfig {
            ddconfig: common::small_ddconfig(8, vec![]),
            n_embed: 32,
            embed_dim: 8,
            quantizer: QuantizerConfig::Vector(VectorQuantizerConfig {
                dead_code_restart: Some(RestartConfig {
                    threshold: 0.5,
                    decay: 0.9,
                }),
                ..Default::default()
            }),
        },
        loss: LossConfig {
            disc_start: 1,
            perceptual_weight: 0.0,
            discriminator: DiscriminatorConfig {
                in_channels: 3,
                ndf: 8,
                n_layers: 2,
            },
            ..LossConfig::default()
        },
        base_learning_rate: 1e-4,
        batch_size: 4,
        grad_accum: 1,
        grad_clip: Some(1.0),
        flip: true,
        seed: 11,
        val_images: Some(16),
        divergence: Default::default(),
        ema: None,
        eval: Default::default(),
    }
}

fn loader(state: LoaderState) -> ShardLoader {
    let shards = list_split(root().join("data/fashion-mnist"), "train").unwrap();
    let cfg = LoaderConfig {
        batch_size: 4,
        preprocess: Preprocess {
            size: 32,
            random_crop: true,
            flip: true,
        },
        // Two interleaved read slots and a shuffle buffer: the resume state carries both.
        reader: ReaderConfig {
            seed: 11,
            shuffle_shards: true,
            read_slots: 2,
            shuffle_buffer: 64,
            ..ReaderConfig::default()
        },
        require_masks: false,
    };
    ShardLoader::open(&shards, cfg, &state).unwrap()
}

fn run(mut trainer: Stage1Trainer, data: &mut ShardLoader, steps: usize) -> Stage1Trainer {
    for _ in 0..steps {
        let batch = data.next_batch().unwrap();
        let x = trainer.to_tensor(&batch);
        let (next, report) = trainer.train_batch(x, None).unwrap();
        assert!(report.is_some(), "a step per batch");
        trainer = next;
    }
    trainer
}

#[test]
fn resume_gives_the_parameters_of_an_uninterrupted_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let straight = Stage1Trainer::new(config(), 1, &device).unwrap();
    let straight = run(straight, &mut loader(LoaderState::default()), 6);

    let tmp = tempfile::tempdir().unwrap();
    let first = Stage1Trainer::new(config(), 1, &device).unwrap();
    let mut data = loader(LoaderState::default());
    let first = run(first, &mut data, 3);
    first.save_checkpoint(tmp.path(), data.state(), 2).unwrap();
    let saved_model = params(first.model());
    let saved_disc = params(first.discriminator());
    drop(first);
    let (resumed, state) = Stage1Trainer::resume(tmp.path(), 1, &device).unwrap();
    assert_eq!(resumed.step(), 3);
    assert_same(&saved_model, &params(resumed.model()));
    assert_same(&saved_disc, &params(resumed.discriminator()));
    let resumed = run(resumed, &mut loader(state), 3);

    assert_eq!(resumed.step(), straight.step());
    assert_same(&params(straight.model()), &params(resumed.model()));
    assert_same(
        &params(straight.discriminator()),
        &params(resumed.discriminator()),
    );
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_loadable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let tmp = tempfile::tempdir().unwrap();
    let trainer = Stage1Trainer::new(config(), 1, &device).unwrap();
    let mut data = loader(LoaderState::default());
    let trainer = run(trainer, &mut data, 2);
    trainer
        .save_checkpoint(tmp.path(), data.state(), 2)
        .unwrap();
    let saved = params(trainer.model());

    // A write that fails half-way (as a full disk would) ...
    let (cfg, mut state): (Stage1Config, Stage1State) =
        checkpoint::read_meta(&checkpoint::latest(tmp.path()).unwrap()).unwrap();
    state.step = 3;
    let err = checkpoint::write(tmp.path(), &cfg, &state, 2, |dir| {
        std::fs::write(dir.join("model.bpk"), b"half a model").unwrap();
        Err(CheckpointError::new(
            dir.join("disc.bpk"),
            "No space left on device",
        ))
    })
    .unwrap_err();
    assert!(err.to_string().contains("disc.bpk"), "{err}");
    // ... and the leftovers of a process killed while writing.
    let killed = tmp.path().join(".ckpt-00000004.partial-999999");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join("model.bpk"), b"truncated").unwrap();

    let (resumed, _) = Stage1Trainer::resume(tmp.path(), 1, &device).unwrap();
    assert_eq!(resumed.step(), 2);
    assert_same(&saved, &params(resumed.model()));
}

/// Through the whole run, with training batches decoded ahead on a background thread: a run
/// stopped after step 3 and resumed from its checkpoint of step 2 ends with a straight run's
/// weights, so the checkpoint kept the position of the batches trained on, not of those made
/// ahead.
#[test]
fn a_run_stopped_and_resumed_with_batches_made_ahead_ends_as_a_straight_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned();
    let run = |out: &std::path::Path, resume: bool, hook: Option<StepHook>| {
        let mut run = RunSettings::single(out.to_path_buf(), 5, Device::flex().autodiff());
        run.checkpoint_every = 2;
        run.eval_every = 5;
        run.prefetch = 3;
        run.resume = resume;
        train(VqganPlan::new(config(), data.clone()), run, hook, false)
    };
    let straight = tmp.path().join("straight");
    run(&straight, false, None).unwrap();
    let split = tmp.path().join("split");
    let err = run(&split, false, Some(Box::new(|_, row| row.step < 3)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 3"), "{err}");
    assert_eq!(run(&split, true, None).unwrap().steps, 5);
    assert_same(&exported_params(&split), &exported_params(&straight));
}

/// An attempt of a cluster job stops writing checkpoints once a newer attempt has claimed the
/// run folder (a partitioned rank 0 still training after its job restarted elsewhere): it
/// fails at its next checkpoint, naming the fence, and `latest` stays the newer attempt's.
#[test]
fn a_stale_attempt_is_fenced_out_of_the_run_folder() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned();
    let out = tmp.path().join("run");
    let mut old = RunSettings::single(out.clone(), 4, Device::flex().autodiff());
    old.checkpoint_every = 2;
    old.attempt = 1;
    let fence = out
        .join("checkpoints")
        .join(taming_worker::checkpoint::FENCE);
    // Attempt 2 claims the run while attempt 1 trains its first steps.
    let hook: StepHook = Box::new(move |_, row| {
        if row.step == 1 {
            std::fs::write(&fence, "2").unwrap();
        }
        true
    });
    let err = train(VqganPlan::new(config(), data), old, Some(hook), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attempt 1 is stale: attempt 2 holds this run"),
        "{err}"
    );
    assert!(
        !out.join("checkpoints/latest").exists(),
        "the stale attempt wrote no checkpoint"
    );
}

/// `decay * average + (1 - decay) * weights`, parameter by parameter.
fn blend(
    average: &[(String, Vec<f32>)],
    weights: &[(String, Vec<f32>)],
    decay: f32,
) -> Vec<(String, Vec<f32>)> {
    average
        .iter()
        .zip(weights)
        .map(|((name, a), (_, w))| {
            let v = a.iter().zip(w).map(|(a, w)| decay * a + (1.0 - decay) * w);
            (name.clone(), v.collect())
        })
        .collect()
}

/// With `ema`, the evaluated model is a copy of the weights up to step `start`, then
/// `decay * average + (1 - decay) * weights` after every step (checked against the weights
/// after each step); checkpoints keep it, so a resumed run's average is a straight run's.
#[test]
fn the_weight_average_follows_its_formula_and_survives_resume() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let cfg = Stage1Config {
        ema: Some(EmaConfig {
            decay: 0.75,
            start: 2,
        }),
        ..config()
    };
    let mut trainer = Stage1Trainer::new(cfg, 1, &device).unwrap();
    let mut data = loader(LoaderState::default());
    let mut expected = params(trainer.model());
    for step in 1..=4 {
        trainer = run(trainer, &mut data, 1);
        let weights = params(trainer.model());
        expected = if step > 2 {
            blend(&expected, &weights, 0.75)
        } else {
            weights
        };
        assert_same(&expected, &params(&trainer.eval_model()));
    }
    assert_ne!(params(trainer.model()), params(&trainer.eval_model()));

    let tmp = tempfile::tempdir().unwrap();
    trainer
        .save_checkpoint(tmp.path(), data.state(), 2)
        .unwrap();
    let straight = run(trainer, &mut data, 2);
    let (resumed, state) = Stage1Trainer::resume(tmp.path(), 1, &device).unwrap();
    let resumed = run(resumed, &mut loader(state), 2);
    assert_same(
        &params(&straight.eval_model()),
        &params(&resumed.eval_model()),
    );
    assert_same(&params(straight.model()), &params(resumed.model()));
}

/// A run with `ema` exports the average as `model/` (what `vqgan` and validation use) and
/// the trained weights as `model-raw/`.
#[test]
fn a_run_with_ema_exports_the_average_and_the_raw_weights() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned();
    let cfg = Stage1Config {
        ema: Some(EmaConfig {
            decay: 0.5,
            start: 0,
        }),
        ..config()
    };
    let mut run = RunSettings::single(tmp.path().to_path_buf(), 3, Device::flex().autodiff());
    run.eval_every = 3;
    train(VqganPlan::new(cfg, data), run, None, false).unwrap();
    let read = |dir: &str| std::fs::read(tmp.path().join(dir).join("model.safetensors")).unwrap();
    let (average, raw) = (read("model"), read("model-raw"));
    assert_eq!(average.len(), raw.len());
    assert_ne!(average, raw, "the average is not the weights after 3 steps");
}
