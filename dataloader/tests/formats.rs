//! The image kinds real data sets hold besides plain RGB (CMYK and grayscale JPEGs as in
//! ImageNet, PNGs with alpha or a palette) decode to what PIL's `convert("RGB")`, the
//! reference's loading, makes of them. Fixtures: tools/fixtures/make_image_fixtures.py.

mod common;

use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use taming_dataloader::Preprocess;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

#[test]
fn cmyk_gray_alpha_and_palette_images_decode_as_pil_converts_them() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let expected = expected.as_object().unwrap();
    assert_eq!(expected.len(), 5);
    for (name, want) in expected {
        let w = want["size"][0].as_u64().unwrap() as usize;
        let h = want["size"][1].as_u64().unwrap() as usize;
        let rgb: Vec<u8> = want["rgb"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        // The centre h x h crop, no resize: the pixels as decoded.
        let pre = Preprocess {
            size: h,
            random_crop: false,
            flip: false,
        };
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let got = pre
            .apply(&bytes, &mut StdRng::seed_from_u64(0))
            .unwrap_or_else(|e| panic!("{name} ({}): {e}", want["mode"]));
        let left = (w - h) / 2;
        // JPEG decoders may differ by a level or two; lossless files must agree exactly.
        let tolerance = if name.ends_with(".jpg") { 4.0 } else { 0.0 };
        for c in 0..3 {
            for y in 0..h {
                for x in 0..h {
                    let pil = rgb[(y * w + left + x) * 3 + c] as f32;
                    let ours = (got[(c * h + y) * h + x] + 1.0) * 127.5;
                    assert!(
                        (ours - pil).abs() <= tolerance + 1e-3,
                        "{name}: channel {c} at ({x}, {y}): {ours} vs PIL {pil}"
                    );
                }
            }
        }
    }
}

/// A file whose extension lies about its format (ImageNet's training set holds a PNG named
/// `.JPEG`) decodes by its content, through the loader.
#[test]
fn images_decode_by_their_content_not_their_extension() {
    let bytes = |name: &str| std::fs::read(fixtures().join(name)).unwrap();
    let (png, jpg) = (bytes("rgba.png"), bytes("gray.jpg"));
    let read = |url: &str, files: &[(&str, &[u8])]| {
        common::put_shard(url, files);
        let cfg = taming_dataloader::LoaderConfig::simple(
            2,
            Preprocess {
                size: 12,
                random_crop: false,
                flip: false,
            },
            0,
            false,
        );
        let urls = vec![url.to_string()];
        let mut loader =
            taming_dataloader::ShardLoader::open(&urls, cfg, &Default::default()).unwrap();
        let batch = loader.next_in_epoch().unwrap().unwrap();
        assert_eq!(loader.skipped(), 0);
        batch.images
    };
    let named = read(
        "memory://formats/named.tar",
        &[("a.png", &png), ("b.jpg", &jpg)],
    );
    let swapped = read(
        "memory://formats/swapped.tar",
        &[("a.jpg", &png), ("b.png", &jpg)],
    );
    assert_eq!(named, swapped);
}
