//! The project's own model directory: save and load round trips, refusals, bad files.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, Distribution, Tensor};
use common::values;
use taming_model::Vqgan;
use taming_model::checkpoint::native::{CONFIG_FILE, WEIGHTS_FILE, load_model, save_model};
use taming_model::config::{
    DdConfig, EmaConfig, QuantizerConfig, VectorQuantizerConfig, VqganConfig,
};
use taming_model::quantize::{CodebookMaintainer, QuantizeMode, Quantizer};

fn small_config() -> VqganConfig {
    VqganConfig {
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
            z_channels: 8,
            double_z: false,
        },
        n_embed: 16,
        embed_dim: 8,
        quantizer: QuantizerConfig::Vector(VectorQuantizerConfig {
            ema: Some(EmaConfig::default()),
            codebook_dim: Some(4),
            cosine: true,
            ..Default::default()
        }),
    }
}

/// A model whose EMA statistics have moved away from their initial values.
fn trained_model(device: &Device) -> (VqganConfig, Vqgan, Tensor<4>) {
    let config = small_config();
    let mut model = Vqgan::new(&config, device).unwrap();
    let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), device);
    let QuantizerConfig::Vector(vq_cfg) = &config.quantizer else {
        unreachable!()
    };
    let mut maint = CodebookMaintainer::new(vq_cfg, 16, 1);
    let q = model.encode(x.clone(), QuantizeMode::EVAL);
    let Quantizer::Vector(vq) = model.quantize else {
        unreachable!()
    };
    let idx = q.indices.reshape([2 * 16 * 16]);
    model.quantize = Quantizer::Vector(maint.step(vq, q.lookup_latents, idx).0);
    (config, model, x)
}

#[test]
fn save_then_load_reproduces_outputs_and_codebook_state() {
    let device = Device::flex();
    let (config, model, x) = trained_model(&device);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model(&dir, &config, &model, &BTreeMap::new(), false).unwrap();
    let (loaded_config, loaded) = load_model(&dir, &device).unwrap();
    assert_eq!(loaded_config, config);
    let a = model.forward(x.clone(), QuantizeMode::EVAL);
    let b = loaded.forward(x, QuantizeMode::EVAL);
    assert_eq!(values(a.reconstruction), values(b.reconstruction));
    let (Quantizer::Vector(qa), Quantizer::Vector(qb)) = (&model.quantize, &loaded.quantize) else {
        unreachable!()
    };
    let (ea, eb) = (qa.ema.as_ref().unwrap(), qb.ema.as_ref().unwrap());
    let sizes = values(ea.cluster_size.val());
    assert!(
        sizes.iter().any(|s| (s - 1.0).abs() > 1e-3),
        "EMA moved: {sizes:?}"
    );
    assert_eq!(sizes, values(eb.cluster_size.val()));
    assert_eq!(values(ea.embed_avg.val()), values(eb.embed_avg.val()));
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["model"], "no staging directory is left behind");
}

#[test]
fn existing_directory_is_kept_unless_overwrite() {
    let device = Device::flex();
    let (config, model, _) = trained_model(&device);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model(&dir, &config, &model, &BTreeMap::new(), false).unwrap();
    let err = save_model(&dir, &config, &model, &BTreeMap::new(), false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    save_model(&dir, &config, &model, &BTreeMap::new(), true).unwrap();
    load_model(&dir, &device).unwrap();
}

#[test]
fn weights_that_do_not_fit_the_config_name_the_tensor() {
    let device = Device::flex();
    let (config, model, _) = trained_model(&device);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model(&dir, &config, &model, &BTreeMap::new(), false).unwrap();
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    std::fs::write(
        dir.join(CONFIG_FILE),
        text.replacen("\"n_embed\": 16", "\"n_embed\": 17", 1),
    )
    .unwrap();
    let err = load_model(&dir, &device).unwrap_err().to_string();
    assert!(err.contains("quantize.embedding.weight"), "{err}");
}

#[test]
fn truncated_weights_name_the_file() {
    let device = Device::flex();
    let (config, model, _) = trained_model(&device);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model(&dir, &config, &model, &BTreeMap::new(), false).unwrap();
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), &bytes[..bytes.len() / 3]).unwrap();
    let err = load_model(&dir, &device).unwrap_err().to_string();
    assert!(err.contains(WEIGHTS_FILE), "{err}");
}
