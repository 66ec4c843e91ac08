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
use taming_worker::checkpoint::{self, CheckpointError, TrainState};
use taming_worker::stage1::{RunOptions, Stage1Config, Stage1Trainer, run_stage1};

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

fn run(trainer: &mut Stage1Trainer, data: &mut ShardLoader, steps: usize) {
    for _ in 0..steps {
        let batch = data.next_batch().unwrap();
        let x = trainer.to_tensor(&batch);
        trainer.train_batch(x).expect("a step per batch");
    }
}

#[test]
fn resume_gives_the_parameters_of_an_uninterrupted_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let mut straight = Stage1Trainer::new(config(), 1, &device).unwrap();
    run(&mut straight, &mut loader(LoaderState::default()), 6);

    let tmp = tempfile::tempdir().unwrap();
    let mut first = Stage1Trainer::new(config(), 1, &device).unwrap();
    let mut data = loader(LoaderState::default());
    run(&mut first, &mut data, 3);
    first.save_checkpoint(tmp.path(), data.state(), 2).unwrap();
    let saved_model = params(first.model());
    let saved_disc = params(first.discriminator());
    drop(first);
    let (mut resumed, state) = Stage1Trainer::resume(tmp.path(), 1, &device).unwrap();
    assert_eq!(resumed.step(), 3);
    assert_same(&saved_model, &params(resumed.model()));
    assert_same(&saved_disc, &params(resumed.discriminator()));
    run(&mut resumed, &mut loader(state), 3);

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
    let mut trainer = Stage1Trainer::new(config(), 1, &device).unwrap();
    let mut data = loader(LoaderState::default());
    run(&mut trainer, &mut data, 2);
    trainer
        .save_checkpoint(tmp.path(), data.state(), 2)
        .unwrap();
    let saved = params(trainer.model());

    // A write that fails half-way (as a full disk would) ...
    let (cfg, mut state): (Stage1Config, TrainState) =
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
    let opts = |out: &std::path::Path, resume: bool| {
        let device = Device::flex().autodiff();
        let mut o = RunOptions::single(config(), data.clone(), out.to_path_buf(), 5, device);
        o.run.checkpoint_every = 2;
        o.run.eval_every = 5;
        o.run.prefetch = 3;
        o.run.resume = resume;
        o
    };
    let straight = tmp.path().join("straight");
    run_stage1(opts(&straight, false)).unwrap();
    let split = tmp.path().join("split");
    let mut first = opts(&split, false);
    first.on_step = Some(Box::new(|row| row.step < 3));
    let err = run_stage1(first).unwrap_err().to_string();
    assert!(err.contains("step 3"), "{err}");
    assert_eq!(run_stage1(opts(&split, true)).unwrap().steps, 5);
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
    let mut old = RunOptions::single(config(), data, out.clone(), 4, Device::flex().autodiff());
    old.run.checkpoint_every = 2;
    old.run.attempt = 1;
    let fence = out
        .join("checkpoints")
        .join(taming_worker::checkpoint::FENCE);
    // Attempt 2 claims the run while attempt 1 trains its first steps.
    old.on_step = Some(Box::new(move |row| {
        if row.step == 1 {
            std::fs::write(&fence, "2").unwrap();
        }
        true
    }));
    let err = run_stage1(old).unwrap_err().to_string();
    assert!(
        err.contains("attempt 1 is stale: attempt 2 holds this run"),
        "{err}"
    );
    assert!(
        !out.join("checkpoints/latest").exists(),
        "the stale attempt wrote no checkpoint"
    );
}
