//! What a job runs: [`JobSpec`] with its stage's own part, checked where it is decoded, and
//! the `Submit` and `Cancel` messages.

use super::*;
use crate::coordinator as wire;
use crate::coordinator::job_spec::StageJob as WireStageJob;

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
