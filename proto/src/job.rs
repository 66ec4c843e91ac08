//! The coordinator's messages as validated Rust types: enums for the stage, the job and rank
//! states, the collective and the conditioning, one type per stage for the stage-specific
//! fields, and a checked device. Each message is decoded once, where it arrives (the
//! coordinator's service, the worker's assignment stream, the command line's replies), by one
//! function that refuses it naming the field; the code behind sees only these types, and
//! encodes them again with `to_wire` where they leave.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::coordinator as wire;
use crate::coordinator::job_spec::StageJob as WireStageJob;

/// Most ranks a job may ask for.
pub const MAX_NODES: u32 = 4096;
/// Longest config text a job may carry, in bytes.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Most dataloader services a job may name.
pub const MAX_DATALOADERS: usize = 256;
/// Most losses one progress report may carry.
pub const MAX_LOSSES: usize = 64;
/// Longest message of a progress report, in bytes.
pub const MAX_REPORT_MESSAGE: usize = 4096;
/// Longest worker name or ring address, in bytes.
pub const MAX_NAME: usize = 256;
/// Most devices a worker may offer.
pub const MAX_DEVICES: usize = 64;

/// A field of a message that holds no valid value (refused with INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct DecodeError {
    /// The field, as a path from the message decoded (`spec.transformer_job.vqgan`).
    pub field: String,
    /// Why its value is refused.
    pub reason: String,
}

impl DecodeError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<DecodeError> for tonic::Status {
    fn from(e: DecodeError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

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

/// The stage-1 part of a job: nothing beyond the common fields yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VqganJob {}

/// The stage-2 part of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformerJob {
    /// The first-stage VQGAN model directory.
    pub vqgan: String,
    /// What the transformer is conditioned on.
    pub cond: Conditioning,
    /// Code Parquet (file or directory with `_manifest.json`); absent: encode the shards.
    pub codes: Option<String>,
    /// Validation code Parquet.
    pub val_codes: Option<String>,
    /// The cond-stage VQGAN (segmentation).
    pub cond_vqgan: Option<String>,
}

/// The stage a job trains, with that stage's own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageJob {
    /// Stage 1.
    Vqgan(VqganJob),
    /// Stage 2.
    Transformer(TransformerJob),
}

/// What a job runs (a checked `JobSpec`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Training config (YAML text); empty: the embedded default.
    pub config_yaml: String,
    /// Shards: a directory or object-store prefix; empty: the embedded data.
    pub data: String,
    /// Run folder.
    pub out: String,
    /// Total optimizer steps (at least 1).
    pub steps: u64,
    /// Ranks wanted (1..=[`MAX_NODES`]).
    pub nodes: u32,
    /// Fewest ranks a restart may run on (1..=nodes).
    pub min_nodes: u32,
    /// Dataloader service addresses; empty: read the shards in the worker.
    pub dataloaders: Vec<String>,
    /// How the ranks all-reduce.
    pub collective: Collective,
    /// Evaluate every N steps.
    pub eval_every: u64,
    /// Checkpoint every N steps.
    pub checkpoint_every: u64,
    /// Continue the run in `out` from its latest checkpoint.
    pub resume: bool,
    /// Device of every rank.
    pub device: Device,
    /// Object-store copy of the run's checkpoints.
    pub checkpoint_url: Option<String>,
    /// Restarts after failed attempts before the job fails (absent: the coordinator's
    /// default).
    pub max_restarts: Option<u32>,
    /// Seconds a pending job may wait for workers before it fails (0: no limit).
    pub placement_timeout_s: u64,
    /// The stage and its own fields.
    pub stage_job: StageJob,
}

/// `Some(s)` unless `s` is empty.
fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl JobSpec {
    /// The stage the job trains.
    pub fn stage(&self) -> Stage {
        match self.stage_job {
            StageJob::Vqgan(_) => Stage::Vqgan,
            StageJob::Transformer(_) => Stage::Transformer,
        }
    }

    /// Checks a spec (the `spec` field of a submit, an assignment or a job); an empty
    /// device reads as `cpu` and a `min_nodes` of 0 as 1.
    pub fn decode(mut m: wire::JobSpec) -> Result<Self, DecodeError> {
        let stage = Stage::decode(m.stage, "spec.stage")?;
        let stage_job = decode_stage_job(stage, m.stage_job.take())?;
        check_nodes(&m)?;
        check_sizes(&m)?;
        let collective = Collective::decode(m.collective, "spec.collective")?;
        let device = match m.device.as_str() {
            "" => Device::cpu(),
            d => d.parse().map_err(|e| DecodeError::new("spec.device", e))?,
        };
        Ok(Self {
            config_yaml: m.config_yaml,
            data: m.data,
            out: m.out,
            steps: m.steps,
            nodes: m.nodes,
            min_nodes: m.min_nodes.max(1),
            dataloaders: m.dataloaders,
            collective,
            eval_every: m.eval_every,
            checkpoint_every: m.checkpoint_every,
            resume: m.resume,
            device,
            checkpoint_url: nonempty(m.checkpoint_url),
            max_restarts: m.max_restarts,
            placement_timeout_s: m.placement_timeout_s,
            stage_job,
        })
    }

    /// The message.
    pub fn to_wire(&self) -> wire::JobSpec {
        wire::JobSpec {
            stage: self.stage().to_wire(),
            config_yaml: self.config_yaml.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            steps: self.steps,
            nodes: self.nodes,
            min_nodes: self.min_nodes,
            dataloaders: self.dataloaders.clone(),
            collective: self.collective.to_wire(),
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            device: self.device.to_string(),
            checkpoint_url: self.checkpoint_url.clone().unwrap_or_default(),
            max_restarts: self.max_restarts,
            placement_timeout_s: self.placement_timeout_s,
            stage_job: Some(self.stage_job.to_wire()),
        }
    }
}

/// The `stage_job` oneof, which must be present and match `stage`.
fn decode_stage_job(stage: Stage, job: Option<WireStageJob>) -> Result<StageJob, DecodeError> {
    const FIELD: &str = "spec.stage_job";
    match (stage, job) {
        (_, None) => Err(DecodeError::new(
            FIELD,
            "missing (vqgan_job or transformer_job)",
        )),
        (Stage::Vqgan, Some(WireStageJob::VqganJob(_))) => Ok(StageJob::Vqgan(VqganJob {})),
        (Stage::Transformer, Some(WireStageJob::TransformerJob(t))) => {
            TransformerJob::decode(t).map(StageJob::Transformer)
        }
        (stage, Some(other)) => {
            let given = match other {
                WireStageJob::VqganJob(_) => "vqgan_job",
                WireStageJob::TransformerJob(_) => "transformer_job",
            };
            Err(DecodeError::new(
                FIELD,
                format!("a {given} for stage {stage}"),
            ))
        }
    }
}

impl TransformerJob {
    fn decode(m: wire::TransformerJob) -> Result<Self, DecodeError> {
        if m.vqgan.is_empty() {
            return Err(DecodeError::new(
                "spec.transformer_job.vqgan",
                "stage-2 jobs name their first-stage VQGAN",
            ));
        }
        Ok(Self {
            vqgan: m.vqgan,
            cond: Conditioning::decode(m.cond, "spec.transformer_job.cond")?,
            codes: nonempty(m.codes),
            val_codes: nonempty(m.val_codes),
            cond_vqgan: nonempty(m.cond_vqgan),
        })
    }
}

impl StageJob {
    fn to_wire(&self) -> WireStageJob {
        match self {
            Self::Vqgan(VqganJob {}) => WireStageJob::VqganJob(wire::VqganJob {}),
            Self::Transformer(t) => WireStageJob::TransformerJob(wire::TransformerJob {
                vqgan: t.vqgan.clone(),
                cond: t.cond.to_wire(),
                codes: t.codes.clone().unwrap_or_default(),
                val_codes: t.val_codes.clone().unwrap_or_default(),
                cond_vqgan: t.cond_vqgan.clone().unwrap_or_default(),
            }),
        }
    }
}

fn check_nodes(m: &wire::JobSpec) -> Result<(), DecodeError> {
    if m.nodes == 0 || m.nodes > MAX_NODES {
        return Err(DecodeError::new(
            "spec.nodes",
            format!("{} not in 1..={MAX_NODES}", m.nodes),
        ));
    }
    if m.min_nodes > m.nodes {
        return Err(DecodeError::new(
            "spec.min_nodes",
            format!("{} above nodes {}", m.min_nodes, m.nodes),
        ));
    }
    if m.steps == 0 {
        return Err(DecodeError::new("spec.steps", "must be at least 1"));
    }
    Ok(())
}

fn check_sizes(m: &wire::JobSpec) -> Result<(), DecodeError> {
    if m.out.is_empty() {
        return Err(DecodeError::new("spec.out", "empty"));
    }
    if m.config_yaml.len() > MAX_CONFIG_BYTES {
        return Err(DecodeError::new("spec.config_yaml", "over 1 MiB"));
    }
    if m.dataloaders.len() > MAX_DATALOADERS {
        return Err(DecodeError::new(
            "spec.dataloaders",
            format!("over {MAX_DATALOADERS}"),
        ));
    }
    Ok(())
}

/// The spec of a `Submit` call.
pub fn decode_submit(m: wire::SubmitRequest) -> Result<JobSpec, DecodeError> {
    JobSpec::decode(m.spec.ok_or_else(|| DecodeError::new("spec", "missing"))?)
}

/// The state a `Cancel` call left the job in.
pub fn decode_cancel_reply(m: wire::CancelReply) -> Result<JobState, DecodeError> {
    JobState::decode(m.state, "state")
}

/// A worker's registration (a checked `RegisterRequest`).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Name it gives (host name, pod name).
    pub name: String,
    /// Its devices and their memory in bytes (0: unknown).
    pub devices: Vec<(Device, u64)>,
    /// Where it accepts its ring predecessor (`host:port`).
    pub ring_addr: String,
}

impl Registration {
    /// Checks a registration: name and ring address at most [`MAX_NAME`] bytes, the ring
    /// address `host:port`, at most [`MAX_DEVICES`] devices, each a [`Device`].
    pub fn decode(m: wire::RegisterRequest) -> Result<Self, DecodeError> {
        if m.name.len() > MAX_NAME {
            return Err(DecodeError::new("name", format!("over {MAX_NAME} bytes")));
        }
        if m.ring_addr.len() > MAX_NAME {
            return Err(DecodeError::new(
                "ring_addr",
                format!("over {MAX_NAME} bytes"),
            ));
        }
        crate::host_port(&m.ring_addr).map_err(|e| DecodeError::new("ring_addr", e))?;
        if m.devices.len() > MAX_DEVICES {
            return Err(DecodeError::new("devices", format!("over {MAX_DEVICES}")));
        }
        let devices = m
            .devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| match d.spec.parse() {
                Ok(device) => Ok((device, d.memory_bytes)),
                Err(e) => Err(DecodeError::new(format!("devices[{i}].spec"), e)),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: m.name,
            devices,
            ring_addr: m.ring_addr,
        })
    }
}

/// One rank's share of a job attempt (a checked `Assignment`).
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The job.
    pub job_id: String,
    /// Its attempt.
    pub attempt: u32,
    /// This rank (below `world_size`).
    pub rank: u32,
    /// Ranks of the attempt (at least 1).
    pub world_size: u32,
    /// Ring addresses of all ranks, by rank (`world_size` of them).
    pub peers: Vec<String>,
    /// What the job runs.
    pub spec: JobSpec,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// The attempt's ring secret.
    pub ring_secret: [u8; 32],
}

impl Assignment {
    /// Checks an assignment: a spec, the rank within the world, a ring address per rank, a
    /// 32-byte ring secret.
    pub fn decode(m: wire::Assignment) -> Result<Self, DecodeError> {
        if m.world_size == 0 || m.rank >= m.world_size {
            return Err(DecodeError::new(
                "rank",
                format!("{} of world size {}", m.rank, m.world_size),
            ));
        }
        if m.peers.len() != m.world_size as usize {
            return Err(DecodeError::new(
                "peers",
                format!("{} for world size {}", m.peers.len(), m.world_size),
            ));
        }
        let ring_secret = m.ring_secret.as_slice().try_into().map_err(|_| {
            DecodeError::new(
                "ring_secret",
                format!("{} bytes, not 32", m.ring_secret.len()),
            )
        })?;
        let spec = m.spec.ok_or_else(|| DecodeError::new("spec", "missing"))?;
        Ok(Self {
            job_id: m.job_id,
            attempt: m.attempt,
            rank: m.rank,
            world_size: m.world_size,
            peers: m.peers,
            spec: JobSpec::decode(spec)?,
            resume: m.resume,
            ring_secret,
        })
    }

    /// The message.
    pub fn to_wire(&self) -> wire::Assignment {
        wire::Assignment {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            world_size: self.world_size,
            peers: self.peers.clone(),
            spec: Some(self.spec.to_wire()),
            resume: self.resume,
            ring_secret: self.ring_secret.to_vec(),
        }
    }
}

/// A rank's report (a checked `ProgressReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressReport {
    /// The reporting worker.
    pub worker_id: String,
    /// The job.
    pub job_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The rank.
    pub rank: u32,
    /// The step reached.
    pub step: u64,
    /// Losses by name (at most [`MAX_LOSSES`]).
    pub losses: BTreeMap<String, f64>,
    /// Throughput.
    pub images_per_s: f64,
    /// Where the rank stands.
    pub state: RankState,
    /// Why it failed, or how it finished (at most [`MAX_REPORT_MESSAGE`] bytes).
    pub message: String,
    /// A failure worth a restart from the last checkpoint.
    pub retryable: bool,
}

impl ProgressReport {
    /// Checks a report: its state, at most [`MAX_LOSSES`] losses and a message of at most
    /// [`MAX_REPORT_MESSAGE`] bytes.
    pub fn decode(m: wire::ProgressReport) -> Result<Self, DecodeError> {
        if m.losses.len() > MAX_LOSSES {
            return Err(DecodeError::new("losses", format!("over {MAX_LOSSES}")));
        }
        if m.message.len() > MAX_REPORT_MESSAGE {
            return Err(DecodeError::new("message", "over 4 KiB"));
        }
        Ok(Self {
            state: RankState::decode(m.state, "state")?,
            worker_id: m.worker_id,
            job_id: m.job_id,
            attempt: m.attempt,
            rank: m.rank,
            step: m.step,
            losses: m.losses.into_iter().collect(),
            images_per_s: m.images_per_s,
            message: m.message,
            retryable: m.retryable,
        })
    }

    /// The message.
    pub fn to_wire(&self) -> wire::ProgressReport {
        wire::ProgressReport {
            worker_id: self.worker_id.clone(),
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            step: self.step,
            losses: self.losses.clone().into_iter().collect(),
            images_per_s: self.images_per_s,
            state: self.state.to_wire(),
            message: self.message.clone(),
            retryable: self.retryable,
        }
    }
}

/// A job as the coordinator shows it (a checked `Job`).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Id.
    pub job_id: String,
    /// Where it stands.
    pub state: JobState,
    /// What it runs.
    pub spec: JobSpec,
    /// Attempts started.
    pub attempt: u32,
    /// Workers of the current attempt, by rank.
    pub workers: Vec<String>,
    /// Latest step.
    pub step: u64,
    /// Latest losses by name.
    pub losses: BTreeMap<String, f64>,
    /// Latest throughput (images/s for stage 1, tokens/s for stage 2).
    pub images_per_s: f64,
    /// Why it failed or what it is waiting for.
    pub message: String,
    /// Why each ended attempt ended, oldest first.
    pub failures: Vec<String>,
}

impl Job {
    /// Checks a job: its state and spec.
    pub fn decode(m: wire::Job) -> Result<Self, DecodeError> {
        let spec = m.spec.ok_or_else(|| DecodeError::new("spec", "missing"))?;
        Ok(Self {
            job_id: m.job_id,
            state: JobState::decode(m.state, "state")?,
            spec: JobSpec::decode(spec)?,
            attempt: m.attempt,
            workers: m.workers,
            step: m.step,
            losses: m.losses.into_iter().collect(),
            images_per_s: m.images_per_s,
            message: m.message,
            failures: m.failures,
        })
    }

    /// The message.
    pub fn to_wire(&self) -> wire::Job {
        wire::Job {
            job_id: self.job_id.clone(),
            state: self.state.to_wire(),
            spec: Some(self.spec.to_wire()),
            attempt: self.attempt,
            workers: self.workers.clone(),
            step: self.step,
            losses: self.losses.clone().into_iter().collect(),
            images_per_s: self.images_per_s,
            message: self.message.clone(),
            failures: self.failures.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
