//! The image path's pixels against PIL: the shorter side resized to 32 with PIL's
//! antialiased bilinear filter (as torchvision's `Resize` on PIL images) and the centre crop,
//! for a photo shrunk 1.875x and one enlarged 1.6x. The reference's own resize (albumentations
//! `SmallestMaxSize`, cv2 linear without antialiasing) aliases when shrinking; the fixture
//! records how far it is from PIL's. Fixtures: tools/fixtures/make_resize_fixtures.py.

use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use taming_dataloader::Preprocess;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize")
}

/// The validation transform's output for the fixture `name`, as bytes in HWC order.
fn transformed(name: &str, size: usize) -> Vec<u8> {
    let pre = Preprocess {
        size,
        random_crop: false,
        flip: false,
    };
    let bytes = std::fs::read(fixtures().join(format!("{name}.png"))).unwrap();
    let chw = pre.apply(&bytes, &mut StdRng::seed_from_u64(0)).unwrap();
    let plane = size * size;
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| i + c * plane))
        .map(|i| ((chw[i] + 1.0) * 127.5).round() as u8)
        .collect()
}

#[test]
fn shrunk_and_enlarged_photos_match_pils_bilinear_resize_and_centre_crop() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let size = expected["size"].as_u64().unwrap() as usize;
    for name in ["wide", "tall"] {
        let want = image::open(fixtures().join(format!("{name}_pil.png")))
            .unwrap()
            .into_rgb8();
        assert_eq!(want.dimensions(), (size as u32, size as u32));
        let got = transformed(name, size);
        let diffs: Vec<u8> = got
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        let reference = expected[name]["reference_mean_abs_diff_to_pil"]
            .as_f64()
            .unwrap();
        println!(
            "{name}: to PIL max {max} mean {mean:.3}; the reference's resize to PIL mean {reference:.3}"
        );
        assert!(
            max <= 1,
            "{name}: {max} levels from PIL at most (mean {mean:.3})"
        );
        assert!(mean < 0.3, "{name}: mean {mean:.3} levels from PIL");
    }
}
