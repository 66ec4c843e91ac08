//! Run-time device selection: `cpu`, `cuda:N`, `vulkan:N`.
//!
//! `vulkan:N` is the N-th Vulkan adapter of any kind, in the order burn lists them: discrete
//! GPUs first, then integrated, virtual, software (Mesa's lavapipe, which the test suite runs
//! on) and other adapters. On a machine with a discrete GPU, `vulkan:0` is that GPU.

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
            Some(("cuda", n)) => index(n).map(Self::Cuda),
            Some(("vulkan", n)) => index(n).map(Self::Vulkan),
            _ => Err(format!("device `{s}`: expected cpu, cuda:N or vulkan:N")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Vulkan(n) => write!(f, "vulkan:{n}"),
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
        }
    }

    /// Whether this build has the backend (the `cuda` or `vulkan` feature); whether the
    /// machine has the device is [`Self::device`]'s to say.
    pub fn compiled(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::Vulkan(_) => cfg!(feature = "vulkan"),
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

/// The N-th adapter of [`vulkan_adapters`].
#[cfg(feature = "vulkan")]
fn vulkan(n: usize) -> Result<Device, String> {
    let adapters = vulkan_adapters();
    let count = adapters.len();
    adapters.into_iter().nth(n).ok_or_else(|| match count {
        0 => format!("device vulkan:{n}: this machine has no Vulkan adapter (no Vulkan driver?)"),
        _ => format!("device vulkan:{n}: this machine has {count} Vulkan adapter(s), vulkan:0 to vulkan:{}", count - 1),
    })
}

/// The machine's Vulkan adapters, discrete GPUs first, then integrated, virtual, software
/// (`DeviceKind::Cpu`: lavapipe) and other ones (burn's order). Listing them does not open
/// them.
#[cfg(feature = "vulkan")]
pub fn vulkan_adapters() -> Vec<Device> {
    Device::enumerate(burn::tensor::DeviceType::Vulkan)
        .into_iter()
        .collect()
}

#[cfg(not(feature = "vulkan"))]
fn vulkan(n: usize) -> Result<Device, String> {
    Err(format!(
        "device vulkan:{n}: this build has no Vulkan support (rebuild with `--features vulkan`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("vulkan:0".parse(), Ok(DeviceSpec::Vulkan(0)));
        assert!("tpu:0".parse::<DeviceSpec>().unwrap_err().contains("tpu:0"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn a_backend_missing_from_the_build_is_named() {
        for spec in [DeviceSpec::Cuda(1), DeviceSpec::Vulkan(2)] {
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
    #[cfg(feature = "vulkan")]
    #[test]
    fn a_vulkan_index_past_the_adapters_is_refused() {
        let count = vulkan_adapters().len();
        let err = DeviceSpec::Vulkan(count).device().unwrap_err();
        assert!(err.contains(&format!("vulkan:{count}")), "{err}");
    }
}
