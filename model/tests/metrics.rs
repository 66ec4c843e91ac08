//! SSIM and PSNR against scikit-image (`tools/fixtures/make_metric_fixtures.py`): a crop of
//! one of its photos against a JPEG, a blurred and a noisy copy of it.

mod common;

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use common::fixtures_dir;
use taming_model::metrics::{psnr, ssim};

/// A PNG as a `[1, 3, h, w]` tensor in [-1, 1].
fn load(path: &Path) -> Tensor<4> {
    let img = image::open(path).unwrap().into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * h + y as usize) * w + x as usize] = px.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), &Device::flex())
}

#[test]
fn ssim_and_psnr_are_scikit_images() {
    let dir = fixtures_dir().join("metrics");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let reference = load(&dir.join("reference.png"));
    for name in ["jpeg30", "blur", "noise"] {
        let changed = load(&dir.join(format!("{name}.png")));
        let theirs = &expected[name];
        let s = ssim(reference.clone(), changed.clone())[0];
        let p = psnr(reference.clone(), changed)[0];
        let (ts, tp) = (
            theirs["ssim"].as_f64().unwrap(),
            theirs["psnr"].as_f64().unwrap(),
        );
        assert!((s - ts).abs() < 1e-4, "{name}: SSIM {s}, scikit-image {ts}");
        assert!(
            (p - tp).abs() < 1e-3,
            "{name}: PSNR {p} dB, scikit-image {tp}"
        );
    }
}
