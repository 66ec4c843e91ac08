//! `vqgan encode --device` on the test device (`TAMING_TEST_DEVICE`: Mesa's lavapipe in CI)
//! gives the CPU's codes, and the reference's, for both photos of every parity fixture,
//! each taken at its own size (`--no-resize`), as the reference encoded them; `reconstruct`
//! and `decode --device` give the CPU's pictures (and the reference decoder's) within a
//! level. Skips with a printed line where the build or the machine has no such device
//! (`model/tests/common/device.rs`).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/device.rs"]
mod device;

use std::path::Path;
use std::process::{Command, Output};

use common::{Expected, fixture};
use device::test_device;
use taming_model::codes::CodeGrid;

fn vqgan(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vqgan"))
        .args(args)
        .output()
        .expect("run vqgan");
    assert!(
        out.status.success(),
        "vqgan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_on_the_device_gives_the_cpus_codes_for_every_fixture() {
    let Some(dev) = test_device("vqgan encode on the test device") else {
        return;
    };
    let spec = dev.spec.to_string();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["vq_a", "vq_b", "gumbel"] {
        let dir = fixture(name);
        let model = tmp.path().join(name);
        vqgan(&[
            "import-taming",
            "--config",
            s(&dir.join("model.yaml")),
            "--ckpt",
            s(&dir.join("model.ckpt")),
            "--out",
            s(&model),
        ]);
        let (shape, reference) = Expected::load(name).i64s("indices");
        let (h, w) = (shape[1], shape[2]);
        for image in 0..2 {
            let photo = dir.join(format!("photo_{image}.png"));
            let encode = |device: &str| {
                let out = tmp.path().join(format!("{name}-{image}-{device}.json"));
                vqgan(&[
                    "encode",
                    "--model",
                    s(&model),
                    "--image",
                    s(&photo),
                    "--no-resize",
                    "--device",
                    device,
                    "--out",
                    s(&out),
                ]);
                CodeGrid::read(&out).unwrap().indices
            };
            let cpu = encode("cpu");
            let on_device = encode(&spec);
            assert_eq!(cpu, on_device, "{name} photo {image}: cpu vs {spec}");
            // The reference encoded the photos as they are.
            let rows: Vec<Vec<i64>> = reference[image * h * w..(image + 1) * h * w]
                .chunks(w)
                .map(<[i64]>::to_vec)
                .collect();
            assert_eq!(
                on_device, rows,
                "{name} photo {image}: the reference's codes"
            );
        }
    }
}

/// The largest difference between two pictures of the same size, in levels.
fn largest_difference(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn reconstruct_and_decode_on_the_device_give_the_cpus_pictures() {
    let Some(dev) = test_device("vqgan reconstruct and decode on the test device") else {
        return;
    };
    let spec = dev.spec.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("vq_a");
    let model = tmp.path().join("vq_a");
    vqgan(&[
        "import-taming",
        "--config",
        s(&dir.join("model.yaml")),
        "--ckpt",
        s(&dir.join("model.ckpt")),
        "--out",
        s(&model),
    ]);
    let photo = dir.join("photo_0.png");
    let codes = tmp.path().join("codes.json");
    vqgan(&[
        "encode",
        "--model",
        s(&model),
        "--image",
        s(&photo),
        "--no-resize",
        "--out",
        s(&codes),
    ]);
    let picture = |command: &str, device: &str| {
        let out = tmp.path().join(format!("{command}-{device}.png"));
        let input = match command {
            "reconstruct" => ["--image", s(&photo)],
            _ => ["--codes", s(&codes)],
        };
        let mut args = vec![command, "--model", s(&model), "--device", device];
        args.extend(input);
        args.extend(["--out", s(&out)]);
        vqgan(&args);
        image::open(&out).unwrap().to_rgb8()
    };
    for command in ["reconstruct", "decode"] {
        let (cpu, on_device) = (picture(command, "cpu"), picture(command, &spec));
        let d = largest_difference(&cpu, &on_device);
        assert!(d <= 1, "{command}: {spec} is {d} levels from the CPU");
    }
    // The reference decoder's output for the photo, as 8-bit pixels.
    let (_, dec) = Expected::load("vq_a").f32s("decoder_out");
    let reference = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([0, 1, 2].map(|c| {
            let r = dec[c * 32 * 32 + y as usize * 32 + x as usize].clamp(-1.0, 1.0);
            ((r + 1.0) * 127.5).round() as u8
        }))
    });
    let d = largest_difference(&picture("reconstruct", &spec), &reference);
    assert!(
        d <= 1,
        "reconstruct on {spec}: {d} levels from the reference decoder"
    );
}
