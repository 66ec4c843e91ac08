//! `vqgan encode --device` on the test device (`TAMING_TEST_DEVICE`: Mesa's lavapipe in CI)
//! gives the CPU's codes, and the reference's, for both photos of every parity fixture,
//! each taken at its own size (`--no-resize`), as the reference encoded them. Skips with a printed line where the build or the machine has no
//! such device (`model/tests/common/device.rs`).

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
