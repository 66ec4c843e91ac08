//! Run-time device selection: `cpu`, `cuda:N`, `vulkan:N`, `wgpu:N`.
//!
//! `vulkan:N` is the N-th Vulkan adapter of any kind, in the order burn lists them: discrete
//! GPUs first, then integrated, virtual, software (Mesa's lavapipe) and other adapters; its
//! kernels are cubecl's SPIR-V. `wgpu:N` is the N-th adapter wgpu finds, in the same order,
//! with the kernels in WGSL, which wgpu translates for the adapter's API: the test suite
//! runs on lavapipe this way, whose compiler crashes on cubecl's SPIR-V for kernels with
//! shared memory. On a machine with a discrete GPU, `vulkan:0` and `wgpu:0` are that GPU.

use std::str::FromStr;

use burn::tensor::Device;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The Flex CPU backend.
    Cpu,
    /// CUDA device N (needs the `cuda` feature).
    Cuda(usize),
    /// Vulkan adapter N of any kind: discrete GPUs first, a software adapter such as
    /// lavapipe after the GPUs (needs the `vulkan` feature).
    Vulkan(usize),
    /// Adapter N of wgpu with WGSL kernels, in the same order (needs the `wgpu` feature).
    Wgpu(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let index = |rest: &str| {
            rest.parse::<usize>()
                .map_err(|_| format!("device `{s}`: `{rest}` is not a device index"))
        };
        match s.split_once(':') {
            None if s == "cpu" => Ok(Self::Cpu),
            None if s == "cuda" => Ok(Self::Cuda(0)),
            None if s == "vulkan" => Ok(Self::Vulkan(0)),
            None if s == "wgpu" => Ok(Self::Wgpu(0)),
            Some(("cuda", n)) => index(n).map(Self::Cuda),
            Some(("vulkan", n)) => index(n).map(Self::Vulkan),
            Some(("wgpu", n)) => index(n).map(Self::Wgpu),
            _ => Err(format!(
                "device `{s}`: expected cpu, cuda:N, vulkan:N or wgpu:N"
            )),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Vulkan(n) => write!(f, "vulkan:{n}"),
            Self::Wgpu(n) => write!(f, "wgpu:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The burn device, or why this build or this machine cannot provide it.
    pub fn device(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            Self::Cuda(n) => cuda(n),
            Self::Vulkan(n) => vulkan(n),
            Self::Wgpu(n) => wgpu(n),
        }
    }

    /// Whether this build has the backend (the `cuda` or `vulkan` feature); whether the
    /// machine has the device is [`Self::device`]'s to say.
    pub fn compiled(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::Vulkan(_) => cfg!(feature = "vulkan"),
            Self::Wgpu(_) => cfg!(feature = "wgpu"),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device, String> {
    Ok(Device::cuda(n))
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize) -> Result<Device, String> {
    Err(format!(
        "device cuda:{n}: this build has no CUDA support (rebuild with `--features cuda`)"
    ))
}

/// The N-th of `adapters`, or why there is none (`kind` names the device kind).
#[cfg(any(feature = "vulkan", feature = "wgpu"))]
fn nth_adapter(kind: &str, adapters: Vec<Device>, n: usize) -> Result<Device, String> {
    let count = adapters.len();
    adapters.into_iter().nth(n).ok_or_else(|| match count {
        0 => format!("device {kind}:{n}: this machine has no {kind} adapter (no Vulkan driver?)"),
        _ => format!(
            "device {kind}:{n}: this machine has {count} {kind} adapter(s), {kind}:0 to \
             {kind}:{}",
            count - 1
        ),
    })
}

#[cfg(feature = "vulkan")]
fn vulkan(n: usize) -> Result<Device, String> {
    nth_adapter("vulkan", adapters(burn::tensor::DeviceType::Vulkan), n)
}

#[cfg(feature = "wgpu")]
fn wgpu(n: usize) -> Result<Device, String> {
    nth_adapter("wgpu", adapters(burn::tensor::DeviceType::Wgpu), n)
}

/// The machine's adapters of `kind`, discrete GPUs first, then integrated, virtual, software
/// (`DeviceKind::Cpu`: lavapipe) and other ones (burn's order). Listing them does not open
/// them.
#[cfg(any(feature = "vulkan", feature = "wgpu"))]
pub fn adapters(kind: burn::tensor::DeviceType) -> Vec<Device> {
    Device::enumerate(kind).into_iter().collect()
}

#[cfg(not(feature = "vulkan"))]
fn vulkan(n: usize) -> Result<Device, String> {
    Err(format!(
        "device vulkan:{n}: this build has no Vulkan support (rebuild with `--features vulkan`)"
    ))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(n: usize) -> Result<Device, String> {
    Err(format!(
        "device wgpu:{n}: this build has no wgpu support (rebuild with `--features wgpu`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_kinds() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("vulkan:0".parse(), Ok(DeviceSpec::Vulkan(0)));
        assert_eq!("wgpu:1".parse(), Ok(DeviceSpec::Wgpu(1)));
        assert!("tpu:0".parse::<DeviceSpec>().unwrap_err().contains("tpu:0"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn a_backend_missing_from_the_build_is_named() {
        for spec in [
            DeviceSpec::Cuda(1),
            DeviceSpec::Vulkan(2),
            DeviceSpec::Wgpu(3),
        ] {
            if spec.compiled() {
                continue;
            }
            let err = spec.device().unwrap_err();
            assert!(
                err.contains(&spec.to_string()) && err.contains("--features"),
                "{err}"
            );
        }
        assert!(DeviceSpec::Cpu.compiled());
    }

    /// An index past the machine's adapters is refused with their count, not left to fail
    /// at the first tensor.
    #[cfg(feature = "wgpu")]
    #[test]
    fn an_index_past_the_adapters_is_refused() {
        let count = adapters(burn::tensor::DeviceType::Wgpu).len();
        let err = DeviceSpec::Wgpu(count).device().unwrap_err();
        assert!(err.contains(&format!("wgpu:{count}")), "{err}");
    }
}
