//! Support shared by the worker's tests (each test binary uses a part of it).
#![allow(dead_code)]

use burn::store::ModuleSnapshot;
use taming_model::config::DdConfig;
use taming_worker::stage2::{GptShape, Schedule, Stage2Config};

/// A small VQGAN shape for 32x32 RGB images: 32 base channels, two levels (f2), one residual
/// block per level, attention at `attn_resolutions`.
pub fn small_ddconfig(z_channels: usize, attn_resolutions: Vec<usize>) -> DdConfig {
    DdConfig {
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions,
        dropout: 0.0,
        resamp_with_conv: true,
        in_channels: 3,
        resolution: 32,
        z_channels,
        double_z: false,
    }
}

/// Little-endian f32 bytes as numbers.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A module's parameters by name, in name order.
pub fn params<M: ModuleSnapshot>(m: &M) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = m
        .collect(None, None, false)
        .into_iter()
        .map(|t| (t.name.clone(), f32s(&t.into_bytes().unwrap())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The parameters a run exported (`RUN/model/model.safetensors`) by name, in name order.
pub fn exported_params(run: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    params_in(&run.join("model"))
}

/// The parameters of a model directory (`DIR/model.safetensors`) by name, in name order.
pub fn params_in(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, f32s(t.data())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The same parameters (names and sizes), equal up to float summation order (1e-5 of each
/// tensor's scale).
pub fn assert_same(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
    assert_eq!(a.len(), b.len());
    for ((name, x), (other, y)) in a.iter().zip(b) {
        assert_eq!((name, x.len()), (other, y.len()), "the same parameter");
        let scale = x.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * scale,
            "{name}: differs by {worst} (scale {scale})"
        );
    }
}

/// A 2-layer, 2-head, 32-wide class-conditional GPT (10 classes) with a cosine schedule after
/// 2 warm-up steps, for the stage-2 tests.
pub fn small_stage2_config(batch_size: usize) -> Stage2Config {
    Stage2Config {
        gpt: GptShape {
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attn_pdrop: 0.0,
        },
        window: None,
        pkeep: 1.0,
        permuter: Default::default(),
        n_classes: Some(10),
        base_learning_rate: 1e-4,
        batch_size,
        grad_accum: 1,
        weight_decay: 0.01,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        min_lr_ratio: 0.1,
        grad_clip: None,
        seed: 5,
        ema: None,
    }
}
