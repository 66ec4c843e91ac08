//! The JPEG window path (scaled IDCT, cropped and skipped scanlines, a crop-box resize)
//! against the full-decode path and against PIL. Its pixels are within a stated tolerance of
//! the full path's for random crops and flips at several output sizes, landscape and
//! portrait, baseline and progressive, 4:2:0 and 4:4:4, greyscale, enlarged; a CMYK JPEG,
//! which libjpeg cannot give as RGB, takes the full path and matches it exactly; broken and
//! truncated JPEGs are errors. Fixtures: tools/fixtures/make_jpeg_fixtures.py.

use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use taming_dataloader::Preprocess;

/// The stated tolerance (in levels of 0..=255) of the window path against the full path:
/// the mean absolute difference over a crop's values, and the largest difference.
const MEAN_LEVELS: f64 = 2.5;
const MAX_LEVELS: u8 = 32;

fn fixture(name: &str) -> Vec<u8> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn levels(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// (mean, max) absolute difference in levels.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    (mean, *d.iter().max().unwrap())
}

fn both_paths(pre: &Preprocess, bytes: &[u8], seed: u64) -> (Vec<u8>, Vec<u8>) {
    let fast = pre.apply(bytes, &mut StdRng::seed_from_u64(seed)).unwrap();
    let full = pre
        .apply_full_decode(bytes, &mut StdRng::seed_from_u64(seed))
        .unwrap();
    (levels(&fast), levels(&full))
}

#[test]
fn random_crops_stay_within_the_tolerance_of_the_full_decode() {
    for name in ["landscape.jpg", "portrait.jpg", "gray.jpg", "small.jpg"] {
        let bytes = fixture(name);
        for size in [256, 224, 128, 64] {
            let pre = Preprocess {
                size,
                random_crop: true,
                flip: true,
            };
            let mut worst = (0.0f64, 0u8);
            for seed in 0..6 {
                let (fast, full) = both_paths(&pre, &bytes, seed);
                let (mean, max) = diff(&fast, &full);
                worst = (worst.0.max(mean), worst.1.max(max));
            }
            println!("{name} at {size}: mean {:.3} max {}", worst.0, worst.1);
            assert!(
                worst.0 <= MEAN_LEVELS && worst.1 <= MAX_LEVELS,
                "{name} at {size}: mean {:.3} (at most {MEAN_LEVELS}), max {} (at most {MAX_LEVELS})",
                worst.0,
                worst.1
            );
        }
    }
}

#[test]
fn centre_crops_stay_within_the_tolerance_of_pils_full_decode() {
    let size = 128;
    for name in ["landscape", "portrait"] {
        let pre = Preprocess {
            size,
            random_crop: false,
            flip: false,
        };
        let got = levels(
            &pre.apply(
                &fixture(&format!("{name}.jpg")),
                &mut StdRng::seed_from_u64(0),
            )
            .unwrap(),
        );
        let want = image::load_from_memory(&fixture(&format!("{name}_pil128.png")))
            .unwrap()
            .into_rgb8();
        let plane = size * size;
        let want: Vec<u8> = (0..3)
            .flat_map(|c| (0..plane).map(move |i| (i, c)))
            .map(|(i, c)| want.as_raw()[3 * i + c])
            .collect();
        let (mean, max) = diff(&got, &want);
        println!("{name}: to PIL mean {mean:.3} max {max}");
        assert!(
            mean <= MEAN_LEVELS && max <= MAX_LEVELS,
            "{name}: mean {mean:.3}, max {max}"
        );
    }
}

#[test]
fn a_cmyk_jpeg_takes_the_full_path() {
    let bytes = fixture("cmyk.jpg");
    let pre = Preprocess {
        size: 128,
        random_crop: true,
        flip: true,
    };
    for seed in 0..3 {
        let (fast, full) = both_paths(&pre, &bytes, seed);
        assert_eq!(fast, full, "seed {seed}");
    }
}

#[test]
fn broken_jpegs_are_errors() {
    let bytes = fixture("landscape.jpg");
    let pre = Preprocess {
        size: 128,
        random_crop: true,
        flip: false,
    };
    let mut rng = StdRng::seed_from_u64(0);
    for cut in [3, 20, 200] {
        let err = pre.apply(&bytes[..cut], &mut rng).unwrap_err();
        assert!(err.starts_with("image:"), "{cut} bytes: {err}");
    }
    // A file cut inside the rows the crop reads: libjpeg's premature end is an error (as
    // PIL's "image file is truncated"), not rows of grey.
    let err = pre.apply(&bytes[..bytes.len() / 2], &mut rng).unwrap_err();
    assert!(err.contains("Premature end of JPEG file"), "{err}");
    let mut scrambled = bytes.clone();
    scrambled[2..400].fill(0x5A);
    let err = pre.apply(&scrambled, &mut rng).unwrap_err();
    assert!(err.starts_with("image:"), "{err}");
}
