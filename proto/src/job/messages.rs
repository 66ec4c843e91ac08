//! The cluster's other messages, checked where they arrive: a worker's registration, a rank's
//! assignment and report, a job as the coordinator shows it.

use std::collections::BTreeMap;

use super::*;
use crate::coordinator as wire;

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
