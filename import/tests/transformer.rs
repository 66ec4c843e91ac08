//! Stage-2 transformer: parity of GPT logits with the reference (fixtures made by
//! tools/fixtures/make_gpt_fixtures.py with taming-transformers 0.0.1), the reference's token
//! orders, the KV cache against full forwards, sliding-window sampling (against the
//! reference's own loop, and plain against reuse) and the errors of bad requests.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Expected, assert_close_to_max, values};
use taming_import::net2net::{ImportedTransformer, import_net2net};
use taming_model::checkpoint::native;
use taming_model::transformer::permuter::Permutation;
use taming_model::transformer::{
    Cond, Conditioning, GridCond, KvCache, PermuterKind, Sampling, TokenLayout, WindowMode,
    sample_grid, sample_window,
};

fn fixture(name: &str) -> PathBuf {
    common::fixtures_dir().join("transformer").join(name)
}

fn import(name: &str, window: Option<[usize; 2]>) -> ImportedTransformer {
    let dir = fixture(name);
    import_net2net(
        &dir.join("model.yaml"),
        &dir.join("model.ckpt"),
        window,
        &Device::flex(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ints(v: Vec<i64>, shape: [usize; 2]) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v, shape), &Device::flex())
}

#[test]
fn gpt_logits_match_the_reference() {
    for (name, window) in [
        ("uncond", Some([4, 8])),
        ("class", Some([4, 8])),
        ("segmentation", None),
    ] {
        let imported = import(name, window);
        assert!(
            imported.ignored.is_empty(),
            "{name}: {:?}",
            imported.ignored
        );
        let exp = Expected::from_file(&fixture(name).join("expected.safetensors"));
        let (shape, idx) = exp.i64s("idx");
        let logits = imported.gpt.forward(ints(idx, [shape[0], shape[1]]));
        let (_, want) = exp.f32s("logits");
        assert_close_to_max(name, &values(logits), &want, 1e-4);
    }
}

#[test]
fn import_reads_the_conditioning_and_stages() {
    let class = import("class", Some([4, 8]));
    assert_eq!(class.config.cond, Conditioning::Class { n_classes: 10 });
    assert_eq!(class.config.cond_offset, Some(0));
    assert!(class.cond_stage.is_none());
    let seg = import("segmentation", None);
    assert_eq!(seg.config.window, [4, 4]);
    assert_eq!(seg.config.permuter, PermuterKind::ZCurve);
    assert_eq!(
        seg.config.cond,
        Conditioning::Segmentation {
            n_embed: 32,
            classes: 5
        }
    );
    let (cfg, _) = seg.cond_stage.as_ref().expect("cond stage");
    assert_eq!(cfg.ddconfig.in_channels, 5);
    assert_eq!(seg.first_stage.0.n_embed, 64);
}

#[test]
fn import_without_a_fitting_window_names_the_block_size() {
    let dir = fixture("uncond");
    let err = import_net2net(
        &dir.join("model.yaml"),
        &dir.join("model.ckpt"),
        None,
        &Device::flex(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("block_size"), "{err}");
}

#[test]
fn token_orders_match_the_reference() {
    let exp = Expected::from_file(&fixture("permuters.safetensors"));
    for (name, kind, grid) in [
        ("zcurve_4x4", PermuterKind::ZCurve, [4, 4]),
        ("zcurve_8x8", PermuterKind::ZCurve, [8, 8]),
        ("zcurve_16x16", PermuterKind::ZCurve, [16, 16]),
        ("subsample_8x8", PermuterKind::Subsample, [8, 8]),
        ("subsample_16x16", PermuterKind::Subsample, [16, 16]),
    ] {
        let (_, want) = exp.i64s(name);
        let ours: Vec<i64> = Permutation::new(kind, grid)
            .unwrap()
            .order()
            .iter()
            .map(|&p| p as i64)
            .collect();
        assert_eq!(ours, want, "{name}");
    }
    let seg = Expected::from_file(&fixture("segmentation").join("expected.safetensors"));
    let (_, raw) = seg.i64s("raw_codes_8x8");
    let (_, permuted) = seg.i64s("permuted_codes_8x8");
    let perm = Permutation::new(PermuterKind::ZCurve, [8, 8]).unwrap();
    for (r, p) in raw.chunks(64).zip(permuted.chunks(64)) {
        assert_eq!(perm.forward(r), p);
        assert_eq!(perm.backward(p), r);
    }
}

#[test]
fn kv_cache_gives_the_full_forward_logits() {
    let m = import("class", Some([4, 8]));
    let exp = Expected::from_file(&fixture("class").join("expected.safetensors"));
    let (_, idx) = exp.i64s("idx");
    let row: Vec<i64> = idx[..40].to_vec();
    let full = values(m.gpt.forward(ints(row.clone(), [1, 40])));
    let mut cache = KvCache::default();
    let mut cached = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, 1), (7, 20), (27, 13)] {
        let part = ints(row[start..start + len].to_vec(), [1, len]);
        cached.extend(values(m.gpt.forward_cached(part, &mut cache)));
    }
    assert_eq!(cache.len(), 40);
    assert_close_to_max("cached logits", &cached, &full, 1e-5);
    // A truncated cache continues from its prefix.
    cache.truncate(10);
    let again = values(
        m.gpt
            .forward_cached(ints(row[10..12].to_vec(), [1, 2]), &mut cache),
    );
    assert_close_to_max("after truncate", &again, &full[10 * 64..12 * 64], 1e-5);
}

fn class_layout(window: [usize; 2]) -> (ImportedTransformer, TokenLayout) {
    let m = import("class", Some(window));
    let layout = TokenLayout::new(m.config.clone()).unwrap();
    (m, layout)
}

#[test]
fn cached_sampling_draws_what_uncached_sampling_draws() {
    let (m, layout) = class_layout([4, 8]);
    let conds = vec![
        layout.cond_rows(&Cond::Class(3)).unwrap(),
        layout.cond_rows(&Cond::Class(7)).unwrap(),
    ];
    let top_k = Sampling {
        temperature: 1.0,
        top_k: Some(8),
        top_p: Some(0.95),
    };
    for sampling in [Sampling::GREEDY, top_k] {
        let a = sample_window(&m.gpt, &layout, &conds, sampling, 5, false).unwrap();
        let b = sample_window(&m.gpt, &layout, &conds, sampling, 5, true).unwrap();
        assert_eq!(a, b, "{sampling:?}");
        assert_eq!(a.len(), 2);
        assert!(
            a.iter()
                .all(|img| img.len() == 32 && img.iter().all(|&c| (0..64).contains(&c)))
        );
    }
    let other = sample_window(&m.gpt, &layout, &conds, top_k, 6, true).unwrap();
    let first = sample_window(&m.gpt, &layout, &conds, top_k, 5, true).unwrap();
    assert_ne!(other, first, "another seed draws other codes");
}

/// On an 18x20 grid with a 16x16 window, both modes pick, greedily, the codes that the
/// reference's own loop (`run_conditional` of scripts/sample_conditional.py at HEAD, run by
/// tools/fixtures/make_window_fixtures.py) picks for the same GPT and cond codes.
#[test]
fn sliding_window_sampling_picks_what_the_reference_loop_picks() {
    let m = import("window", Some([16, 16]));
    assert_eq!(m.config.permuter, PermuterKind::Identity);
    let layout = TokenLayout::new(m.config.clone()).unwrap();
    let exp = Expected::from_file(&fixture("window").join("sampled.safetensors"));
    let (_, cond) = exp.i64s("cond");
    let (_, want) = exp.i64s("codes");
    for mode in [WindowMode::Plain, WindowMode::Reuse] {
        let got = sample_grid(
            &m.gpt,
            &layout,
            [18, 20],
            &GridCond::Spatial(cond.clone()),
            Sampling::GREEDY,
            0,
            mode,
        )
        .unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{mode:?}: {differ} of {} codes differ",
            want.len()
        );
    }
}

#[test]
fn sliding_window_reuse_gives_the_plain_rule_tokens() {
    let (m, layout) = class_layout([4, 4]);
    let cond = GridCond::Fixed(layout.cond_rows(&Cond::Class(2)).unwrap());
    let plain = sample_grid(
        &m.gpt,
        &layout,
        [7, 9],
        &cond,
        Sampling::GREEDY,
        1,
        WindowMode::Plain,
    )
    .unwrap();
    let reuse = sample_grid(
        &m.gpt,
        &layout,
        [7, 9],
        &cond,
        Sampling::GREEDY,
        1,
        WindowMode::Reuse,
    )
    .unwrap();
    assert_eq!(plain, reuse);
    assert_eq!(plain.len(), 63);
    // On a grid the size of the window the rule is plain autoregressive sampling.
    let small = sample_grid(
        &m.gpt,
        &layout,
        [4, 4],
        &cond,
        Sampling::GREEDY,
        1,
        WindowMode::Reuse,
    )
    .unwrap();
    let GridCond::Fixed(rows) = &cond else {
        unreachable!()
    };
    let window = sample_window(
        &m.gpt,
        &layout,
        std::slice::from_ref(rows),
        Sampling::GREEDY,
        1,
        true,
    )
    .unwrap();
    assert_eq!(small, window[0]);
}

#[test]
fn sliding_window_follows_spatial_conditioning() {
    let mut m = import("segmentation", None);
    m.config.permuter = PermuterKind::Identity;
    let layout = TokenLayout::new(m.config.clone()).unwrap();
    let (h, w) = (6, 7);
    let cond_codes: Vec<i64> = (0..h * w).map(|i| (i * 7 % 32) as i64).collect();
    let cond = GridCond::Spatial(cond_codes.clone());
    let sampling = Sampling {
        temperature: 0.7,
        top_k: Some(16),
        top_p: None,
    };
    let plain = sample_grid(
        &m.gpt,
        &layout,
        [h, w],
        &cond,
        sampling,
        9,
        WindowMode::Plain,
    )
    .unwrap();
    let reuse = sample_grid(
        &m.gpt,
        &layout,
        [h, w],
        &cond,
        sampling,
        9,
        WindowMode::Reuse,
    )
    .unwrap();
    assert_eq!(plain, reuse);
    let other = GridCond::Spatial(cond_codes.iter().map(|c| (c + 5) % 32).collect());
    let changed = sample_grid(
        &m.gpt,
        &layout,
        [h, w],
        &other,
        sampling,
        9,
        WindowMode::Reuse,
    )
    .unwrap();
    assert_ne!(plain, changed, "the cond map steers the samples");
}

#[test]
fn bad_requests_are_refused_with_the_option_named() {
    let (m, layout) = class_layout([4, 4]);
    let cond = GridCond::Fixed(layout.cond_rows(&Cond::Class(1)).unwrap());
    let small = sample_grid(
        &m.gpt,
        &layout,
        [3, 8],
        &cond,
        Sampling::GREEDY,
        0,
        WindowMode::Plain,
    )
    .unwrap_err()
    .to_string();
    assert!(small.contains("grid") && small.contains("3x8"), "{small}");
    let big_k = Sampling {
        top_k: Some(65),
        ..Sampling::default()
    };
    let err = sample_grid(&m.gpt, &layout, [4, 4], &cond, big_k, 0, WindowMode::Plain)
        .unwrap_err()
        .to_string();
    assert!(err.contains("top_k") && err.contains("64"), "{err}");
    let err = layout.cond_rows(&Cond::Class(10)).unwrap_err().to_string();
    assert!(err.contains("class 10"), "{err}");
    let err = layout.cond_rows(&Cond::None).unwrap_err().to_string();
    assert!(err.contains("class"), "{err}");
    let seg = import("segmentation", None);
    let seg_layout = TokenLayout::new(seg.config.clone()).unwrap();
    let err = seg_layout
        .cond_rows(&Cond::Codes(vec![40; 16]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("40") && err.contains("32"), "{err}");
}

#[test]
fn native_transformer_dirs_round_trip() {
    let m = import("uncond", Some([4, 8]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpt");
    native::save_transformer(&out, &m.config, &m.gpt, false).unwrap();
    let (config, gpt) = native::load_transformer(&out, &Device::flex()).unwrap();
    assert_eq!(config, m.config);
    let idx = ints((0..20).collect(), [1, 20]);
    assert_eq!(values(gpt.forward(idx.clone())), values(m.gpt.forward(idx)));
    let err = native::save_transformer(&out, &m.config, &m.gpt, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // A VQGAN directory is not a transformer.
    let vq = dir.path().join("vq");
    let (cfg, model) = &m.first_stage;
    native::save_model(&vq, cfg, model, &Default::default(), false).unwrap();
    let err = native::load_transformer(&vq, &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn every_gpt_parameter_trains_and_decay_scales_linear_weights_only() {
    use burn::optim::GradientsParams;
    use burn::store::ModuleSnapshot;
    use taming_model::transformer::{Gpt, GptConfig};
    let device = Device::flex().autodiff();
    device.seed(1);
    let cfg = GptConfig {
        vocab_size: 16,
        block_size: 8,
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        attn_pdrop: 0.0,
    };
    let gpt = Gpt::new(&cfg, &device);
    let idx: Tensor<2, Int> =
        Tensor::from_data(TensorData::new(vec![1i64, 5, 7, 2], [1, 4]), &device);
    let loss = gpt.forward(idx).powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &gpt);
    let params = gpt.collect(None, None, false);
    assert_eq!(grads.len(), params.len(), "every parameter gets a gradient");
    let floats = |g: &Gpt| -> Vec<(String, Vec<f32>)> {
        g.collect(None, None, false)
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                let bytes = t.into_bytes().unwrap();
                let v = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (name, v)
            })
            .collect()
    };
    let before = floats(&gpt);
    let after = floats(&gpt.clone().scale_linear_weights(0.5));
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let linear = name.ends_with(".weight") && !name.starts_with("tok_emb");
        let factor = if linear { 0.5 } else { 1.0 };
        assert!(
            a.iter().zip(b).all(|(x, y)| (x * factor - y).abs() <= 1e-7),
            "{name}: scaled by {factor}?"
        );
    }
}
