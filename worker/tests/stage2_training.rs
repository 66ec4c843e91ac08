//! Stage-2 training through the run engine: from code Parquet (as `dataloader
//! precompute-codes` writes it) and on the fly from the embedded image shards, class- and
//! segmentation-conditioned, resumed from a checkpoint, and refusing bad data with nothing
//! written.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{assert_same, exported_params, params_in, small_stage2_config};
use taming_dataloader::codes::{CodeRow, write_codes};
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_model::Vqgan;
use taming_model::checkpoint::native;
use taming_model::config::{DdConfig, QuantizerConfig, VqganConfig};
use taming_model::synthesis::{SynthCond, Synthesizer};
use taming_model::transformer::{Sampling, TokenLayout};
use taming_tests::process::root;
use taming_worker::engine::{RunError, RunSummary, StepHook, train};
use taming_worker::learner::EmaConfig;
use taming_worker::settings::RunSettings;
use taming_worker::stage2::data::encode_batch;
use taming_worker::stage2::{CondKind, Stage2Config, TransformerPlan};

/// burn's random generator is process-global: tests (threads of one binary) that seed it and
/// compare exact results must not run at the same time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn data() -> String {
    root()
        .join("data/fashion-mnist")
        .to_string_lossy()
        .into_owned()
}

/// A random f4 VQGAN for 32x32 images (8x8 tokens, 64 codes), saved as a model directory.
fn vqgan(dir: &Path, in_channels: usize, seed: u64) -> PathBuf {
    let config = VqganConfig {
        ddconfig: DdConfig {
            ch: 32,
            out_ch: in_channels,
            ch_mult: vec![1, 1, 1],
            num_res_blocks: 1,
            attn_resolutions: vec![8],
            dropout: 0.0,
            resamp_with_conv: true,
            in_channels,
            resolution: 32,
            z_channels: 8,
            double_z: false,
        },
        n_embed: 64,
        embed_dim: 8,
        quantizer: QuantizerConfig::default(),
    };
    let device = Device::flex();
    device.seed(seed);
    let model = Vqgan::new(&config, &device).unwrap();
    let out = dir.join(format!("vqgan-{in_channels}"));
    native::save_model(&out, &config, &model, &Default::default(), true).unwrap();
    out
}

/// Code rows of the first `n` training images, encoded by `vq` (and, for segmentation, the
/// silhouette maps encoded by `cond_vq`), as precompute-codes writes them.
fn code_rows(vq: &Path, n: usize) -> Vec<CodeRow> {
    let device = Device::flex();
    let (_, model) = native::load_model(vq, &device).unwrap();
    let shards = list_split(data(), "train").unwrap();
    let cfg = LoaderConfig {
        batch_size: 32,
        preprocess: Preprocess {
            size: 32,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig::default(),
        require_masks: false,
    };
    let mut loader = ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap();
    let mut rows = Vec::new();
    while rows.len() < n {
        let batch = loader.next_batch().unwrap();
        for (i, s) in encode_batch(&model, &batch, &device)
            .into_iter()
            .enumerate()
        {
            rows.push(CodeRow {
                key: batch.keys[i].clone(),
                codes: s.codes.iter().map(|&c| c as i32).collect(),
                height: s.grid[0] as i32,
                width: s.grid[1] as i32,
                label: s.label,
                cond_codes: None,
                shard: batch.sources[i].clone(),
            });
        }
    }
    rows.truncate(n);
    rows
}

/// A stage-2 run as a test sets it up: the plan (reached through `Deref`), the settings, the
/// hook.
struct Options {
    plan: TransformerPlan,
    run: RunSettings,
    on_step: Option<StepHook>,
}

impl std::ops::Deref for Options {
    type Target = TransformerPlan;
    fn deref(&self) -> &TransformerPlan {
        &self.plan
    }
}

impl std::ops::DerefMut for Options {
    fn deref_mut(&mut self) -> &mut TransformerPlan {
        &mut self.plan
    }
}

fn options(cfg: Stage2Config, vq: &Path, cond: CondKind, out: &Path, steps: u64) -> Options {
    let mut run = RunSettings::single(out.to_path_buf(), steps, Device::flex().autodiff());
    run.eval_every = 5;
    run.checkpoint_every = 5;
    Options {
        plan: TransformerPlan::new(cfg, vq.to_path_buf(), cond, data()),
        run,
        on_step: None,
    }
}

fn train_run(o: Options) -> Result<RunSummary, RunError> {
    train(o.plan, o.run, o.on_step, false)
}

#[test]
fn class_conditional_training_from_parquet_learns_and_exports() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 1);
    let rows = code_rows(&vq, 256);
    let codes = write_parquet(tmp.path(), "codes.parquet", &rows);
    let out = tmp.path().join("run");
    let mut o = options(small_stage2_config(16), &vq, CondKind::Class, &out, 30);
    o.codes = Some(codes);
    let s = train_run(o).unwrap();
    assert_eq!(s.steps, 30);
    assert!(
        s.last_val < 0.8 * s.first_val,
        "validation cross-entropy {} -> {}",
        s.first_val,
        s.last_val
    );
    for f in [
        "metrics.csv",
        "samples.png",
        "model/config.json",
        "model/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let samples = image::open(out.join("samples.png")).unwrap().into_rgb8();
    assert_eq!(
        samples.dimensions(),
        (8 * 34 - 2, 10 * 34 - 2),
        "one row of eight 32x32 samples per class, 2 pixels apart"
    );
    let (cfg, _) = native::load_transformer(&out.join("model"), &Device::flex()).unwrap();
    let seed = small_stage2_config(16).seed;
    assert_rows_are_the_models_class_samples(&samples, &out.join("model"), &vq, seed);
    assert_eq!(cfg.n_embed, 64);
    assert_eq!(cfg.window, [8, 8]);
    assert_eq!(
        cfg.gpt.vocab_size,
        64 + 10,
        "class tokens get their own range"
    );
}

/// Row `c` of `samples` holds the exported model's eight samples for class `c`, as
/// `vqgan sample --class c --seed SEED+c --top-k 64` draws them from `model/` and the VQGAN.
fn assert_rows_are_the_models_class_samples(
    samples: &image::RgbImage,
    model: &Path,
    vq: &Path,
    seed: u64,
) {
    let device = Device::flex();
    let (cfg, gpt) = native::load_transformer(model, &device).unwrap();
    let (vq_cfg, vq_model) = native::load_model(vq, &device).unwrap();
    let layout = TokenLayout::new(cfg.clone()).unwrap();
    let synth = Synthesizer {
        gpt: &gpt,
        layout: &layout,
        vqgan: (&vq_cfg, &vq_model),
        cond_vqgan: None,
        device,
    };
    let sampling = Sampling {
        temperature: 1.0,
        top_k: Some(64),
        top_p: None,
    };
    for class in 0..10u32 {
        let cond = synth
            .grid_cond(&SynthCond::Class(class as i64), cfg.window)
            .unwrap();
        let codes = synth
            .sample_codes(&cond, cfg.window, 8, sampling, seed + class as u64)
            .unwrap();
        for (i, want) in synth.decode(&codes, cfg.window).iter().enumerate() {
            let cell = image::imageops::crop_imm(samples, i as u32 * 34, class * 34, 32, 32);
            assert!(
                cell.to_image() == *want,
                "samples.png row {class}, column {i}: not the model's sample for class {class}"
            );
        }
    }
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 2);
    let codes = write_parquet(tmp.path(), "codes.parquet", &code_rows(&vq, 64));
    let opts = |out: &Path, resume: bool| {
        // With a weight average: it is checkpointed and exported beside the raw weights.
        let cfg = Stage2Config {
            ema: Some(EmaConfig {
                decay: 0.8,
                start: 2,
            }),
            ..small_stage2_config(8)
        };
        let mut o = options(cfg, &vq, CondKind::None, out, 10);
        o.codes = Some(codes.clone());
        o.run.resume = resume;
        o
    };
    let straight = tmp.path().join("straight");
    train_run(opts(&straight, false)).unwrap();
    // Stopped after step 7: the checkpoint of step 5 is the latest.
    let split = tmp.path().join("split");
    let mut first = opts(&split, false);
    first.on_step = Some(Box::new(|_, row| row.step < 7));
    let err = train_run(first).unwrap_err().to_string();
    assert!(err.contains("step 7"), "{err}");
    let s = train_run(opts(&split, true)).unwrap();
    assert_eq!(s.steps, 10);
    assert_same(&exported_params(&split), &exported_params(&straight));
    let raw = |run: &Path| params_in(&run.join("model-raw"));
    assert_same(&raw(&split), &raw(&straight));
    assert_ne!(
        raw(&split),
        exported_params(&split),
        "model/ is the average"
    );
    let metrics = std::fs::read_to_string(split.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 11, "{metrics}");
}

#[test]
fn on_the_fly_encoding_trains_from_the_image_shards() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 3);
    let out = tmp.path().join("run");
    let s = train_run(options(
        small_stage2_config(16),
        &vq,
        CondKind::Class,
        &out,
        12,
    ))
    .unwrap();
    assert!(s.last_val < s.first_val, "{s:?}");
    assert!(out.join("model/model.safetensors").is_file());
}

#[test]
fn segmentation_conditioning_trains_on_cond_codes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 4);
    let cond_vq = vqgan(tmp.path(), 11, 5);
    let mut rows = code_rows(&vq, 64);
    // Cond codes as precompute-codes --cond-vqgan writes them: a code per image token.
    for r in &mut rows {
        r.cond_codes = Some(r.codes.iter().map(|c| (c * 7 + 3) % 64).collect());
    }
    let codes = write_parquet(tmp.path(), "codes.parquet", &rows);
    let out = tmp.path().join("run");
    let mut o = options(
        small_stage2_config(8),
        &vq,
        CondKind::Segmentation,
        &out,
        10,
    );
    o.codes = Some(codes);
    o.cond_vqgan = Some(cond_vq);
    let s = train_run(o).unwrap();
    assert!(s.last_val < s.first_val, "{s:?}");
    let (cfg, _) = native::load_transformer(&out.join("model"), &Device::flex()).unwrap();
    assert_eq!(cfg.cond_len(), 64);
    assert_eq!(cfg.gpt.block_size, 64 + 64 - 1);
    assert!(out.join("samples.png").is_file());
}

/// Writes `rows` as the code Parquet `dir/name`; returns its path.
fn write_parquet(dir: &Path, name: &str, rows: &[CodeRow]) -> String {
    let path = dir.join(name).to_string_lossy().into_owned();
    write_codes(&path, rows).unwrap();
    path
}

fn refused(o: Options, out: &Path) -> String {
    let err = train_run(o).unwrap_err().to_string();
    assert!(!out.join("model").exists(), "nothing exported");
    assert!(!out.join("checkpoints").exists(), "no checkpoint");
    err
}

/// `--val-codes`: validation reads its own Parquet (without it, rows held out of the training
/// ones), and a bad row or a missing file there is named as such.
#[test]
fn validation_codes_come_from_their_own_parquet() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 7);
    let rows = code_rows(&vq, 128);
    let train = write_parquet(tmp.path(), "train.parquet", &rows);
    let run = |val: Option<&str>, out: &str| {
        let out = tmp.path().join(out);
        let mut o = options(small_stage2_config(4), &vq, CondKind::Class, &out, 1);
        o.codes = Some(train.clone());
        o.val_codes = val.map(String::from);
        (train_run(o), out)
    };
    let first_val = |val, out| run(val, out).0.unwrap().first_val;
    let default = first_val(None, "default");
    let other = write_parquet(tmp.path(), "val-tail.parquet", &rows[64..]);
    assert_ne!(first_val(Some(&other), "tail"), default);

    let mut bad_rows = rows[64..].to_vec();
    bad_rows[2].codes[0] = 64;
    let bad = write_parquet(tmp.path(), "val-bad.parquet", &bad_rows);
    let missing = tmp.path().join("val-missing.parquet");
    for (val, expect) in [(bad.as_str(), "row 2"), (missing.to_str().unwrap(), "")] {
        let (result, out) = run(Some(val), "refused");
        let err = result.unwrap_err().to_string();
        assert!(err.contains(val) && err.contains(expect), "{err}");
        assert!(!out.join("model").exists(), "nothing exported");
    }
}

/// Without `--val-codes` a tenth of the rows (here 12 of 128: every tenth, the 10th, 20th,
/// ...) is held out: the run trains and validates exactly as one given the other 116 rows as
/// `--codes` and those 12 as `--val-codes`.
#[test]
fn without_validation_codes_every_tenth_row_is_held_out_of_training() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 8);
    let rows = code_rows(&vq, 128);
    let (held, kept): (Vec<_>, Vec<_>) = rows
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 10 == 9);
    let strip = |v: Vec<(usize, CodeRow)>| v.into_iter().map(|(_, r)| r).collect::<Vec<_>>();
    let (held, kept) = (strip(held), strip(kept));
    assert_eq!(held.len(), 12);
    let run = |codes: &[CodeRow], val: Option<&[CodeRow]>, name: &str| {
        let out = tmp.path().join(name);
        let mut o = options(small_stage2_config(4), &vq, CondKind::Class, &out, 6);
        o.codes = Some(write_parquet(tmp.path(), &format!("{name}.parquet"), codes));
        o.val_codes = val.map(|v| write_parquet(tmp.path(), &format!("{name}-val.parquet"), v));
        (train_run(o).unwrap(), out)
    };
    let (default, default_out) = run(&rows, None, "default");
    let (split, split_out) = run(&kept, Some(&held), "split");
    assert_eq!(default.first_val, split.first_val);
    assert_eq!(default.last_val, split.last_val);
    assert_same(&exported_params(&default_out), &exported_params(&split_out));
}

#[test]
fn bad_code_files_are_refused_naming_file_and_field() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let vq = vqgan(tmp.path(), 3, 6);
    let mut rows = code_rows(&vq, 8);
    rows[3].codes[5] = 64;
    let codes = write_parquet(tmp.path(), "outside.parquet", &rows);
    let out = tmp.path().join("run");
    let mut o = options(small_stage2_config(4), &vq, CondKind::None, &out, 2);
    o.codes = Some(codes);
    let err = refused(o, &out);
    assert!(
        err.contains("outside.parquet") && err.contains("row 3") && err.contains("64"),
        "{err}"
    );

    // Another schema: a Parquet file without the code columns.
    let schema = tmp.path().join("schema.parquet");
    {
        use std::sync::Arc;
        let batch = arrow_array::RecordBatch::try_from_iter([(
            "pixels",
            Arc::new(arrow_array::Int32Array::from(vec![1, 2, 3])) as arrow_array::ArrayRef,
        )])
        .unwrap();
        let file = std::fs::File::create(&schema).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let mut o = options(small_stage2_config(4), &vq, CondKind::None, &out, 2);
    o.codes = Some(schema.to_string_lossy().into_owned());
    let err = refused(o, &out);
    assert!(
        err.contains("schema.parquet") && err.contains("`key`"),
        "{err}"
    );

    // Class conditioning on rows without labels.
    let mut rows = code_rows(&vq, 8);
    rows[0].label = None;
    let unlabeled = write_parquet(tmp.path(), "unlabeled.parquet", &rows);
    let mut o = options(small_stage2_config(4), &vq, CondKind::Class, &out, 2);
    o.codes = Some(unlabeled);
    let err = refused(o, &out);
    assert!(
        err.contains("unlabeled.parquet") && err.contains("`label`"),
        "{err}"
    );

    // Segmentation without codes.
    let o = options(small_stage2_config(4), &vq, CondKind::Segmentation, &out, 2);
    let err = refused(o, &out);
    assert!(err.contains("--cond-vqgan"), "{err}");
}
