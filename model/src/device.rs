//! Run-time device selection: `cpu`, `cuda:N`, `vulkan:N`.

use std::str::FromStr;

use burn::tensor::Device;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The Flex CPU backend.
    Cpu,
    /// CUDA device N (needs the `cuda` feature).
    Cuda(usize),
    /// Vulkan discrete GPU N (needs the `vulkan` feature).
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
    /// The burn device, or why this build cannot provide it.
    pub fn device(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            Self::Cuda(n) => cuda(n),
            Self::Vulkan(n) => vulkan(n),
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

#[cfg(feature = "vulkan")]
fn vulkan(n: usize) -> Result<Device, String> {
    Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(n)))
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
}
