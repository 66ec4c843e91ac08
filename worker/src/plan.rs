//! The run plan a job becomes, built the same way whether the job comes from the `worker
//! train` command line or from a coordinator's assignment: the stage, its config (the
//! embedded default when none is given) and its inputs.

use std::path::PathBuf;

use anyhow::{Context, Result};

use taming_proto::job::Stage;

use crate::defaults::{default_data, parse_config, parse_stage2_config};
use crate::engine::{self, RunError, RunSummary, StepHook};
use crate::settings::RunSettings;
use crate::stage1::VqganPlan;
use crate::stage2::{CondKind, TransformerPlan};

/// The run folder when none is given: `runs/vqgan` or `runs/transformer`.
pub fn default_out(stage: Stage) -> PathBuf {
    PathBuf::from("runs").join(stage.as_str())
}

/// What a job names, as given.
#[derive(Debug, Clone)]
pub struct JobInputs {
    /// The stage.
    pub stage: Stage,
    /// The config's YAML text (empty: the stage's embedded default).
    pub config_yaml: String,
    /// Where the config came from, for errors.
    pub config_name: String,
    /// Image shards (none: the embedded Fashion-MNIST shards).
    pub data: Option<String>,
    /// Dataloader services to stream stage-1 batches from.
    pub dataloaders: Vec<String>,
    /// Stage 2: the first-stage VQGAN model directory.
    pub vqgan: Option<PathBuf>,
    /// Stage 2: the conditioning.
    pub cond: CondKind,
    /// Stage 2: the cond-stage VQGAN.
    pub cond_vqgan: Option<PathBuf>,
    /// Stage 2: code Parquet for training.
    pub codes: Option<String>,
    /// Stage 2: code Parquet for validation.
    pub val_codes: Option<String>,
}

/// A job ready to run.
pub enum JobPlan {
    /// Stage 1.
    Vqgan(Box<VqganPlan>),
    /// Stage 2.
    Transformer(Box<TransformerPlan>),
}

impl JobPlan {
    /// The plan of `inputs`; errors name the config or the missing input.
    pub fn new(inputs: JobInputs) -> Result<Self> {
        let data = match inputs.data {
            Some(data) => data,
            None => default_data()?.to_string_lossy().into_owned(),
        };
        let (yaml, name) = (&inputs.config_yaml, &inputs.config_name);
        Ok(match inputs.stage {
            Stage::Vqgan => Self::Vqgan(Box::new(VqganPlan {
                dataloaders: inputs.dataloaders,
                ..VqganPlan::new(parse_config(yaml, name)?, data)
            })),
            Stage::Transformer => {
                let vqgan = inputs.vqgan.context(
                    "--stage transformer needs --vqgan MODEL (a stage-1 model directory)",
                )?;
                let config = parse_stage2_config(yaml, name)?;
                Self::Transformer(Box::new(TransformerPlan {
                    cond_vqgan: inputs.cond_vqgan,
                    codes: inputs.codes,
                    val_codes: inputs.val_codes,
                    ..TransformerPlan::new(config, vqgan, inputs.cond, data)
                }))
            }
        })
    }

    /// Trains it (see [`engine::train`]).
    pub fn run(
        self,
        run: RunSettings,
        hook: Option<StepHook>,
        progress: bool,
    ) -> Result<RunSummary, RunError> {
        match self {
            Self::Vqgan(plan) => engine::train(*plan, run, hook, progress),
            Self::Transformer(plan) => engine::train(*plan, run, hook, progress),
        }
    }
}
