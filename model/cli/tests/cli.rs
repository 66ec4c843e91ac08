//! The `vqgan` binary as a user runs it: import a reference checkpoint, encode, reconstruct,
//! decode, and the errors bad input gets.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Expected, fixture};
use taming_model::codes::CodeGrid;

fn vqgan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqgan"))
        .args(args)
        .output()
        .expect("run vqgan")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "vqgan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command expected to fail; returns its stderr.
fn fails(out: Output) -> String {
    assert!(!out.status.success(), "vqgan succeeded unexpectedly");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn import(name: &str, tmp: &Path) -> PathBuf {
    let dir = fixture(name);
    let out = tmp.join(format!("{name}-model"));
    ok(vqgan(&[
        "import-taming",
        "--config",
        s(&dir.join("model.yaml")),
        "--ckpt",
        s(&dir.join("model.ckpt")),
        "--out",
        s(&out),
    ]));
    out
}

fn reference_rows(name: &str, image: usize) -> Vec<Vec<i64>> {
    let (shape, idx) = Expected::load(name).i64s("indices");
    let (h, w) = (shape[1], shape[2]);
    idx[image * h * w..(image + 1) * h * w]
        .chunks(w)
        .map(<[i64]>::to_vec)
        .collect()
}

/// Encodes photo `index` of fixture `name` with `model`; returns the code grid.
fn encode_photo(model: &Path, name: &str, index: usize, extra: &[&str]) -> CodeGrid {
    let photo = fixture(name).join(format!("photo_{index}.png"));
    let codes = model.with_extension(format!("codes{index}.json"));
    let mut args = vec![
        "encode",
        "--model",
        s(model),
        "--image",
        s(&photo),
        "--out",
        s(&codes),
    ];
    args.extend_from_slice(extra);
    ok(vqgan(&args));
    CodeGrid::read(&codes).unwrap()
}

#[test]
fn import_then_encode_reproduces_reference_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    for image in 0..2 {
        let grid = encode_photo(&model, "vq_a", image, &[]);
        assert_eq!(grid.indices, reference_rows("vq_a", image));
    }
}

#[test]
fn no_resize_takes_a_non_square_image_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_b", tmp.path());
    let grid = encode_photo(&model, "vq_b", 1, &["--no-resize"]);
    assert_eq!((grid.indices.len(), grid.indices[0].len()), (8, 12));
    assert_eq!(grid.indices, reference_rows("vq_b", 1));
}

#[test]
fn resize_path_crops_to_the_model_resolution() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_b", tmp.path());
    // photo_0 is 48x32: resized on its shorter side and cropped to 32x32.
    let grid = encode_photo(&model, "vq_b", 0, &[]);
    assert_eq!((grid.indices.len(), grid.indices[0].len()), (8, 8));
}

#[test]
fn reconstruct_matches_reference_and_decode_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    let photo = fixture("vq_a").join("photo_0.png");
    let rec = tmp.path().join("rec.png");
    ok(vqgan(&[
        "reconstruct",
        "--model",
        s(&model),
        "--image",
        s(&photo),
        "--out",
        s(&rec),
    ]));
    let img = image::open(&rec).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 32));
    let (_, dec) = Expected::load("vq_a").f32s("decoder_out");
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            let r = dec[c * 32 * 32 + y as usize * 32 + x as usize].clamp(-1.0, 1.0);
            let expected = ((r + 1.0) * 127.5).round();
            assert!(
                (px.0[c] as f32 - expected).abs() <= 1.0,
                "pixel ({x},{y},{c}): {} vs {expected}",
                px.0[c]
            );
        }
    }
    let codes = tmp.path().join("codes.json");
    ok(vqgan(&[
        "encode",
        "--model",
        s(&model),
        "--image",
        s(&photo),
        "--out",
        s(&codes),
    ]));
    let decoded = tmp.path().join("dec.png");
    ok(vqgan(&[
        "decode",
        "--model",
        s(&model),
        "--codes",
        s(&codes),
        "--out",
        s(&decoded),
    ]));
    assert_eq!(image::open(&decoded).unwrap().to_rgb8(), img);
}

#[test]
fn gumbel_checkpoint_imports_and_encodes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("gumbel", tmp.path());
    let grid = encode_photo(&model, "gumbel", 1, &[]);
    assert_eq!(grid.indices, reference_rows("gumbel", 1));
}

/// Writes the vq_a YAML with `edit` applied to its text.
fn edited_yaml(tmp: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(fixture("vq_a").join("model.yaml")).unwrap();
    let path = tmp.join("edited.yaml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

fn import_fails(tmp: &Path, yaml: &Path, ckpt: &Path) -> String {
    let out = tmp.join("out");
    let err = fails(vqgan(&[
        "import-taming",
        "--config",
        s(yaml),
        "--ckpt",
        s(ckpt),
        "--out",
        s(&out),
    ]));
    assert!(!out.exists(), "nothing may be written under --out");
    let leftovers: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("out"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial output left behind: {leftovers:?}"
    );
    err
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture("vq_a").join("model.ckpt");
    let cases: [(&str, &str, &str); 4] = [
        ("      ch: 32\n", "", "`model.params.ddconfig.ch`"),
        (
            "attn_resolutions:\n      - 16",
            "attn_resolutions:\n      - 7",
            "attn_resolutions",
        ),
        ("n_embed: 64", "n_embed: 0", "n_embed"),
        ("      ch: 32\n", "      ch: 48\n", "ddconfig.ch_mult"),
    ];
    for (from, to, key) in cases {
        let yaml = edited_yaml(tmp.path(), |t| {
            assert!(t.contains(from), "fixture YAML lacks {from:?}");
            t.replacen(from, to, 1)
        });
        let err = import_fails(tmp.path(), &yaml, &ckpt);
        assert!(err.contains(key), "error for {key}: {err}");
    }
}

#[test]
fn checkpoint_that_does_not_fit_its_config_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = edited_yaml(tmp.path(), |t| t.replacen("n_embed: 64", "n_embed: 65", 1));
    let err = import_fails(tmp.path(), &yaml, &fixture("vq_a").join("model.ckpt"));
    assert!(err.contains("quantize.embedding.weight"), "{err}");
    assert!(
        err.contains("[64, 16]") && err.contains("[65, 16]"),
        "{err}"
    );
}

#[test]
fn truncated_checkpoint_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("vq_a").join("model.ckpt")).unwrap();
    let cut = tmp.path().join("cut.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_fails(tmp.path(), &fixture("vq_a").join("model.yaml"), &cut);
    assert!(err.contains("cut.ckpt"), "{err}");
}

#[test]
fn a_file_that_is_not_an_image_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    let fake = tmp.path().join("notes.png");
    std::fs::write(&fake, "this is not an image").unwrap();
    let codes = tmp.path().join("codes.json");
    let err = fails(vqgan(&[
        "encode",
        "--model",
        s(&model),
        "--image",
        s(&fake),
        "--out",
        s(&codes),
    ]));
    assert!(err.contains("notes.png"), "{err}");
    assert!(!codes.exists());
}

#[test]
fn codes_out_of_range_are_refused_with_their_position() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    let codes = tmp.path().join("bad.json");
    std::fs::write(&codes, r#"{"indices": [[1, 2], [3, 64]]}"#).unwrap();
    let out = tmp.path().join("dec.png");
    let err = fails(vqgan(&[
        "decode",
        "--model",
        s(&model),
        "--codes",
        s(&codes),
        "--out",
        s(&out),
    ]));
    assert!(
        err.contains("indices[1][1]") && err.contains("bad.json"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn existing_output_is_not_replaced_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    let (yaml, ckpt) = (
        fixture("vq_a").join("model.yaml"),
        fixture("vq_a").join("model.ckpt"),
    );
    let args = [
        "import-taming",
        "--config",
        s(&yaml),
        "--ckpt",
        s(&ckpt),
        "--out",
        s(&model),
    ];
    let err = fails(vqgan(&args));
    assert!(err.contains("already exists"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(vqgan(&forced));
}

#[test]
fn eval_reports_reconstruction_metrics_over_a_shard_set() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import("vq_a", tmp.path());
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist");
    let loss = common::fixtures_dir().join("loss");
    let report = tmp.path().join("eval.json");
    let out = ok(vqgan(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--lpips-vgg16",
        s(&loss.join("vgg16_2stages.pth")),
        "--lpips-heads",
        s(&loss.join("lpips_heads_2stages.pth")),
        "--lpips-stages",
        "2",
        "--out",
        s(&report),
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PSNR"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // The oracle: the reference's VQModel and scikit-image's PSNR and SSIM on the same
    // images (tools/fixtures/make_eval_fixtures.py).
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures_dir().join("eval/expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["images"], oracle["images"]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
    for (key, tolerance) in [
        ("l1", 1e-4),
        ("psnr", 1e-3),
        ("ssim", 1e-4),
        ("codebook_usage", 0.0),
    ] {
        let (got, want) = (f(&json, key), f(&oracle, key));
        assert!(
            (got - want).abs() <= tolerance,
            "{key}: {got} against the oracle's {want}"
        );
    }
    assert!(f(&json, "lpips") >= 0.0);
}

fn import_transformer(name: &str, tmp: &Path, window: Option<&str>) -> PathBuf {
    let dir = common::fixtures_dir().join("transformer").join(name);
    let out = tmp.join(name);
    let mut args = vec![
        "import-transformer".to_string(),
        "--config".into(),
        dir.join("model.yaml").display().to_string(),
        "--ckpt".into(),
        dir.join("model.ckpt").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(w) = window {
        args.extend(["--window".into(), w.into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(vqgan(&args)).stdout;
    assert!(String::from_utf8_lossy(&stdout).contains("conditioning"));
    out
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap()
}

#[test]
fn sample_draws_class_conditional_grids_and_slides_past_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let m = import_transformer("class", tmp.path(), Some("8x4"));
    let (t, v) = (m.join("transformer"), m.join("vqgan"));
    let out = tmp.path().join("grid.png");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "sample",
            "--transformer",
            s(&t),
            "--vqgan",
            s(&v),
            "--out",
            s(&out),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |extra: &[&str]| vqgan(&base(extra).iter().map(String::as_str).collect::<Vec<_>>());
    // The window itself: 4x8 tokens at factor 1 -> 8x4 pixels, two side by side.
    let text =
        String::from_utf8_lossy(&ok(run(&["--class", "3", "--n", "2", "--top-k", "10"])).stdout)
            .into_owned();
    assert!(text.contains("2 samples of 8x4"), "{text}");
    assert_eq!(png_size(&out), (2 * 8 + 2, 4));
    let first = std::fs::read(&out).unwrap();
    ok(run(&["--class", "3", "--n", "2", "--top-k", "10"]));
    assert_eq!(std::fs::read(&out).unwrap(), first, "same seed, same grid");
    ok(run(&[
        "--class", "3", "--n", "2", "--top-k", "10", "--seed", "1",
    ]));
    assert_ne!(std::fs::read(&out).unwrap(), first, "another seed");
    // Larger than the window: the sliding window.
    let text = String::from_utf8_lossy(
        &ok(run(&[
            "--class",
            "1",
            "--n",
            "1",
            "--size",
            "13x7",
            "--temperature",
            "0",
        ]))
        .stdout,
    )
    .into_owned();
    assert!(text.contains("sliding window"), "{text}");
    assert_eq!(png_size(&out), (13, 7));
    // Bad requests.
    let e = fails(run(&["--class", "1", "--size", "6x3"]));
    assert!(e.contains("grid") && e.contains("smaller"), "{e}");
    let e = fails(run(&["--class", "1", "--top-k", "65"]));
    assert!(e.contains("top_k") && e.contains("64"), "{e}");
    let e = fails(run(&["--class", "12"]));
    assert!(e.contains("class 12"), "{e}");
}

/// An 8-bit palette PNG of `w` x `h` indices from `f`, with colours unlike the indices.
fn palette_png(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(
        (0..=255u8)
            .flat_map(|i| [255 - i, i.wrapping_mul(91), 40])
            .collect::<Vec<u8>>(),
    );
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| f(x, y))
        .collect();
    enc.write_header().unwrap().write_image_data(&data).unwrap();
    out
}

#[test]
fn sample_follows_a_segmentation_map_through_the_cond_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let m = import_transformer("segmentation", tmp.path(), None);
    let map = tmp.path().join("map.png");
    image::GrayImage::from_fn(4, 4, |x, y| image::Luma([((x + y) % 5) as u8]))
        .save(&map)
        .unwrap();
    let out = tmp.path().join("seg.png");
    let (t, v, c) = (m.join("transformer"), m.join("vqgan"), m.join("cond_vqgan"));
    let args = [
        "sample",
        "--transformer",
        s(&t),
        "--vqgan",
        s(&v),
        "--cond-vqgan",
        s(&c),
        "--segmentation",
        s(&map),
        "--n",
        "3",
        "--out",
        s(&out),
    ];
    ok(vqgan(&args));
    assert_eq!(png_size(&out), (3 * 4 + 4, 4));
    // The same labels as a palette PNG (VOC style: indices with colours) draw the same grid.
    let palette_map = tmp.path().join("palette.png");
    std::fs::write(&palette_map, palette_png(4, 4, |x, y| ((x + y) % 5) as u8)).unwrap();
    let palette_out = tmp.path().join("seg_palette.png");
    let mut palette_args = args;
    (palette_args[8], palette_args[12]) = (s(&palette_map), s(&palette_out));
    ok(vqgan(&palette_args));
    assert_eq!(
        std::fs::read(&palette_out).unwrap(),
        std::fs::read(&out).unwrap()
    );
    // COCO-Stuff style ids, one lower (unlabeled 255), with --label-offset 1: the same grid.
    let coco = tmp.path().join("coco.png");
    image::GrayImage::from_fn(4, 4, |x, y| {
        image::Luma([(((x + y) % 5) as u8).wrapping_sub(1)])
    })
    .save(&coco)
    .unwrap();
    let coco_out = tmp.path().join("seg_coco.png");
    let mut coco_args = args.to_vec();
    (coco_args[8], coco_args[12]) = (s(&coco), s(&coco_out));
    coco_args.extend(["--label-offset", "1"]);
    ok(vqgan(&coco_args));
    assert_eq!(
        std::fs::read(&coco_out).unwrap(),
        std::fs::read(&out).unwrap()
    );
    // A colour image is not a label map.
    let rgb = tmp.path().join("rgb.png");
    image::RgbImage::new(4, 4).save(&rgb).unwrap();
    palette_args[8] = s(&rgb);
    let e = fails(vqgan(&palette_args));
    assert!(
        e.contains("rgb.png") && e.contains("label map is RGB"),
        "{e}"
    );
    // A label the cond stage does not know.
    let bad = tmp.path().join("bad.png");
    image::GrayImage::from_fn(4, 4, |x, _| image::Luma([if x == 2 { 7 } else { 0 }]))
        .save(&bad)
        .unwrap();
    let mut args = args;
    args[8] = s(&bad);
    let e = fails(vqgan(&args));
    assert!(
        e.contains("bad.png") && e.contains("label 7") && e.contains("5 classes"),
        "{e}"
    );
    assert_eq!(
        png_size(&out),
        (3 * 4 + 4, 4),
        "the earlier grid is untouched"
    );
    // Without the cond stage.
    let e = fails(vqgan(&[
        "sample",
        "--transformer",
        s(&m.join("transformer")),
        "--vqgan",
        s(&m.join("vqgan")),
        "--segmentation",
        s(&map),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("cond-stage VQGAN"), "{e}");
}

/// The size the paper's high-resolution samples start at: 1024x576 pixels from a
/// transformer whose window is 16x16 tokens of an f16 VQGAN (256x256 training images), by the
/// sliding window (tiny random models: the shapes are what is checked).
#[test]
fn sample_makes_1024x576_images_from_a_256_pixel_window() {
    use burn::tensor::Device;
    use taming_model::checkpoint::native;
    use taming_model::config::{DdConfig, QuantizerConfig, VqganConfig};
    use taming_model::transformer::{Conditioning, Gpt, GptConfig, TransformerConfig};
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    device.seed(3);
    let vq_cfg = VqganConfig {
        ddconfig: DdConfig {
            ch: 32,
            out_ch: 3,
            ch_mult: vec![1, 1, 1, 1, 1],
            num_res_blocks: 1,
            attn_resolutions: vec![16],
            dropout: 0.0,
            resamp_with_conv: true,
            in_channels: 3,
            resolution: 256,
            z_channels: 8,
            double_z: false,
        },
        n_embed: 32,
        embed_dim: 8,
        quantizer: QuantizerConfig::default(),
    };
    let vq = tmp.path().join("vq");
    let model = taming_model::Vqgan::new(&vq_cfg, &device).unwrap();
    native::save_model(&vq, &vq_cfg, &model, &Default::default(), false).unwrap();
    let gpt = GptConfig {
        vocab_size: 0,
        block_size: 0,
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        attn_pdrop: 0.0,
    };
    let t_cfg = TransformerConfig::sized(gpt, 32, [16, 16], Conditioning::None { sos_token: 0 });
    let t = tmp.path().join("t");
    native::save_transformer(&t, &t_cfg, &Gpt::new(&t_cfg.gpt, &device), false).unwrap();
    let out = tmp.path().join("wide.png");
    let text = ok(vqgan(&[
        "sample",
        "--transformer",
        s(&t),
        "--vqgan",
        s(&vq),
        "--size",
        "1024x576",
        "--n",
        "1",
        "--top-k",
        "8",
        "--out",
        s(&out),
    ]))
    .stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("64x36 tokens, sliding window"), "{text}");
    assert_eq!(png_size(&out), (1024, 576));
}
