//! The job's enums as the `.proto` files give them (stage, job and rank states, collective,
//! conditioning) and a checked device.

use std::fmt;
use std::str::FromStr;

use super::DecodeError;
use crate::coordinator as wire;

/// A Rust enum for a `.proto` enum (whose variants, less UNSPECIFIED, it repeats): its text
/// (the command lines', the status page's and the state file's spelling), its wire number,
/// and decoding that refuses UNSPECIFIED and unknown numbers.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $(#[$meta])*
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order of the `.proto` enum.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// How command lines, the status page and the state file write it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// Its number on the wire.
            pub fn to_wire(self) -> i32 {
                match self {
                    $(Self::$variant => wire::$name::$variant as i32,)+
                }
            }

            /// Decodes the wire number `value` of `field`: UNSPECIFIED (0) and numbers this
            /// version does not know are refused.
            pub fn decode(value: i32, field: &str) -> Result<Self, DecodeError> {
                match wire::$name::try_from(value) {
                    $(Ok(wire::$name::$variant) => Ok(Self::$variant),)+
                    Ok(wire::$name::Unspecified) => Err(DecodeError::new(
                        field,
                        format!("{} unspecified ({})", $what, Self::names()),
                    )),
                    Err(_) => Err(DecodeError::new(
                        field,
                        format!("unknown {} {value} ({})", $what, Self::names()),
                    )),
                }
            }

            fn names() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("`{s}` is not a {} ({})", $what, Self::names()))
            }
        }
    };
}

wire_enum! {
    /// What a job trains (`--stage` of `coordinator launch` and `worker train`).
    #[derive(clap::ValueEnum)]
    Stage("stage") {
        /// Stage 1: the VQGAN.
        Vqgan = "vqgan",
        /// Stage 2: the transformer over a trained VQGAN's codes.
        Transformer = "transformer",
    }
}

wire_enum! {
    /// Where a job stands.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    JobState("job state") {
        /// Queued, waiting for workers (or for a restart).
        Pending = "pending",
        /// All ranks placed and running.
        Running = "running",
        /// Finished on every rank.
        Succeeded = "succeeded",
        /// Given up (a rank failed and too few workers remain, or a rank reported an error).
        Failed = "failed",
        /// Stopped by `coordinator cancel`.
        Cancelled = "cancelled",
    }
}

impl JobState {
    /// Whether the job has ended (succeeded, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

wire_enum! {
    /// Where one rank's attempt stands, as the rank reports it.
    RankState("rank state") {
        /// Training (a step report).
        Running = "running",
        /// Done.
        Succeeded = "succeeded",
        /// Stopped by an error.
        Failed = "failed",
    }
}

wire_enum! {
    /// How the ranks of a job all-reduce their gradients.
    #[derive(clap::ValueEnum)]
    Collective("collective") {
        /// The TCP ring between the workers' ring addresses.
        Ring = "ring",
        /// NCCL over CUDA devices.
        Nccl = "nccl",
    }
}

wire_enum! {
    /// What a stage-2 transformer is conditioned on.
    #[derive(clap::ValueEnum)]
    Conditioning("conditioning") {
        /// Nothing.
        None = "none",
        /// The samples' class labels.
        Class = "class",
        /// The samples' segmentation codes (from a cond-stage VQGAN).
        Segmentation = "segmentation",
    }
}

/// A device: `cpu`, or `cuda` / `vulkan` / `wgpu` with or without an ordinal (`cuda:1`). Jobs ask for
/// a kind (`cuda`: each rank on one of the worker's CUDA devices) or one device; workers offer
/// devices with their ordinal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Device(String);

impl Device {
    /// The host.
    pub fn cpu() -> Self {
        Self("cpu".into())
    }

    /// As written (`cuda:1`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `cpu`, `cuda` or `vulkan`.
    pub fn kind(&self) -> &str {
        crate::device_kind(&self.0)
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => (kind, Some(n)),
            None => (s, None),
        };
        let ordinal_ok =
            |n: &str| n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u32>().is_ok();
        let valid = match kind {
            "cpu" => ordinal.is_none(),
            "cuda" | "vulkan" | "wgpu" => ordinal.is_none_or(ordinal_ok),
            _ => false,
        };
        if !valid {
            return Err(format!(
                "`{s}` is not a device (cpu, cuda, vulkan, wgpu, or one of them with :N)"
            ));
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
