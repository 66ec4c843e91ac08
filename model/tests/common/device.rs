//! The device that the device tests (`worker/tests/gpu.rs`, `model/cli/tests/gpu.rs`, which
//! include this file by path) compare with the CPU: `TAMING_TEST_DEVICE` names it
//! (`wgpu:0`, `vulkan:0`, `cuda:0`; parsed as `--device` is). Unset, it is the GPU backend
//! this build has (`cuda:0` with the `cuda` feature, `vulkan:0` with `vulkan`, `wgpu:0` with
//! `wgpu`), otherwise `cpu`, and the device tests skip: they compare the CPU with another
//! backend.
//!
//! A test that cannot run (no device named, its backend not compiled in, no such adapter)
//! prints one line saying why, past the test harness's capture, and passes; with
//! `TAMING_REQUIRE_DEVICE=1` (as `scripts/test.sh` sets it) it fails instead, so CI cannot
//! skip them silently.

use std::io::Write;

use burn::tensor::Device;
use taming_model::device::DeviceSpec;

/// A device to test on.
#[allow(dead_code)] // each including test binary uses a part
#[derive(Debug, Clone)]
pub struct TestDevice {
    /// As named (`wgpu:0`), for `--device`.
    pub spec: DeviceSpec,
    /// The burn device (no autodiff).
    pub device: Device,
}

/// The device named by `TAMING_TEST_DEVICE` (see the module), or `None` after printing why
/// `test` skips; panics instead of skipping when `TAMING_REQUIRE_DEVICE=1`.
pub fn test_device(test: &str) -> Option<TestDevice> {
    match resolve() {
        Ok(found) => Some(found),
        Err(why) if required() => {
            panic!("{test}: {why} (TAMING_REQUIRE_DEVICE=1: the device tests must run, not skip)")
        }
        Err(why) => {
            // Written to the process's stderr, not through print!: the harness would hide it.
            let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
            None
        }
    }
}

fn required() -> bool {
    std::env::var("TAMING_REQUIRE_DEVICE").is_ok_and(|v| v == "1")
}

/// The spec of the test device, from the environment or the build.
fn test_spec() -> Result<DeviceSpec, String> {
    match std::env::var("TAMING_TEST_DEVICE") {
        Ok(text) => text.parse().map_err(|e| format!("TAMING_TEST_DEVICE: {e}")),
        Err(_) => Ok([
            DeviceSpec::Cuda(0),
            DeviceSpec::Vulkan(0),
            DeviceSpec::Wgpu(0),
        ]
        .into_iter()
        .find(|spec| spec.compiled())
        .unwrap_or(DeviceSpec::Cpu)),
    }
}

fn resolve() -> Result<TestDevice, String> {
    let spec = test_spec()?;
    if spec == DeviceSpec::Cpu {
        return Err(
            "the test device is the CPU (TAMING_TEST_DEVICE unset in a build without \
             the wgpu, vulkan or cuda feature, or set to cpu); these tests compare the CPU \
             with another device: TAMING_TEST_DEVICE=wgpu:0 with --features wgpu"
                .into(),
        );
    }
    if !spec.compiled() {
        let feature = match spec {
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::Wgpu(_) => "wgpu",
            _ => "vulkan",
        };
        return Err(format!(
            "TAMING_TEST_DEVICE is {spec}, but this test binary was built without the \
             `{feature}` feature (add --features taming-model/{feature})"
        ));
    }
    let device = spec.device()?;
    Ok(TestDevice { spec, device })
}
