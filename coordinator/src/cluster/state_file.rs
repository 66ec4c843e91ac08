//! The coordinator's state file: written durably (flushed temporary file, rename, flushed
//! directory), with non-finite floats as text and job specs as the flat fields they had
//! before the protocol was typed (so that files of either version load).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Cluster, ClusterError, JobRecord, JobState};

impl Cluster {
    /// Writes the jobs to `dir/jobs.json` when they changed since the last save: a
    /// temporary file, flushed to disk, renamed over the old one, and the directory flushed,
    /// so that a crash leaves the old or the new state whole.
    pub fn save(&mut self, dir: &Path) -> Result<(), ClusterError> {
        let json = serde_json::to_vec_pretty(&self.jobs.values().collect::<Vec<_>>())
            .expect("jobs serialize");
        if self.saved.as_ref() == Some(&json) {
            return Ok(());
        }
        write_durably(dir, &json)?;
        self.saved = Some(json);
        Ok(())
    }

    /// Undoes the changes since the last save (after it failed): the jobs are read back from
    /// what was last written, and workers leave jobs that no longer hold them.
    pub fn rollback(&mut self) {
        self.jobs = match &self.saved {
            Some(json) => serde_json::from_slice::<Vec<JobRecord>>(json)
                .expect("jobs written by save")
                .into_iter()
                .map(|j| (j.id.clone(), j))
                .collect(),
            None => BTreeMap::new(),
        };
        for w in self.workers.values_mut() {
            let held = w
                .job
                .as_ref()
                .and_then(|j| self.jobs.get(j))
                .is_some_and(|j| j.state == JobState::Running && j.workers.contains(&w.id));
            if !held {
                w.job = None;
            }
        }
    }

    /// Reads the jobs saved in `dir` (none when the file does not exist). Jobs that were
    /// running are queued again, to resume from their last checkpoint.
    pub fn load(dir: &Path) -> Result<Self, ClusterError> {
        let path = dir.join("jobs.json");
        let mut cluster = Cluster::default();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cluster),
            Err(e) => {
                return Err(ClusterError::State {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let jobs: Vec<JobRecord> =
            serde_json::from_str(&text).map_err(|e| ClusterError::State {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        cluster.saved = Some(text.into_bytes());
        for mut job in jobs {
            if job.state == JobState::Running {
                job.state = JobState::Pending;
                job.workers.clear();
                job.attempt = job.attempt.max(1);
                job.message = "coordinator restarted; resuming".into();
            }
            let n: u64 = job.id.trim_start_matches("job-").parse().unwrap_or(0);
            cluster.next_job = cluster.next_job.max(n);
            cluster.jobs.insert(job.id.clone(), job);
        }
        Ok(cluster)
    }
}

/// Writes `dir/jobs.json` through a flushed temporary file and a rename, then flushes the
/// directory.
pub(super) fn write_durably(dir: &Path, json: &[u8]) -> Result<(), ClusterError> {
    use std::io::Write;
    let path = dir.join("jobs.json");
    let err = |e: std::io::Error| ClusterError::State {
        path: path.clone(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(".jobs.json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(json).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

/// f64 in the state file: finite values as JSON numbers, NaN and the infinities (a diverged
/// loss) as the strings `NaN`, `inf` and `-inf`, which JSON numbers cannot hold; `null`
/// (how they were once written) reads as NaN.
pub(super) mod float_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
        Null(()),
    }

    fn to_repr(v: f64) -> Repr {
        match v {
            v if v.is_finite() => Repr::Number(v),
            v if v.is_nan() => Repr::Text("NaN".into()),
            v if v > 0.0 => Repr::Text("inf".into()),
            _ => Repr::Text("-inf".into()),
        }
    }

    fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f64, E> {
        match r {
            Repr::Number(v) => Ok(v),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(E::custom(format!("`{other}` is not a number"))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        to_repr(*v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }

    /// The same for every value of a map.
    pub mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serializer};

        use super::{Repr, from_repr, to_repr};

        pub fn serialize<S: Serializer>(
            m: &BTreeMap<String, f64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, to_repr(*v))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, f64>, D::Error> {
            BTreeMap::<String, Repr>::deserialize(d)?
                .into_iter()
                .map(|(k, r)| Ok((k, from_repr(r)?)))
                .collect()
        }
    }
}

/// A job spec in the state file: the flat fields of the `JobSpec` message as it was before the
/// protocol was typed (stage, collective and conditioning as text, the stage-2 fields beside
/// the others, empty for none). Read back through [`JobSpec::decode`], so that a stored spec
/// is checked as a submitted one is; an empty collective reads as `ring` and an empty `cond`
/// as `none`, as they did.
pub(super) mod stored_spec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use taming_proto::coordinator as wire;
    use taming_proto::coordinator::job_spec::StageJob as WireStageJob;
    use taming_proto::job::{Collective, Conditioning, JobSpec, Stage, StageJob};

    #[derive(Serialize, Deserialize, Default)]
    #[serde(default)]
    struct Stored {
        stage: String,
        config_yaml: String,
        data: String,
        out: String,
        steps: u64,
        nodes: u32,
        min_nodes: u32,
        dataloaders: Vec<String>,
        collective: String,
        eval_every: u64,
        checkpoint_every: u64,
        resume: bool,
        device: String,
        vqgan: String,
        cond: String,
        codes: String,
        val_codes: String,
        cond_vqgan: String,
        checkpoint_url: String,
        max_restarts: Option<u32>,
        placement_timeout_s: u64,
    }

    fn to_stored(spec: &JobSpec) -> Stored {
        let m = spec.to_wire();
        let mut stored = Stored {
            stage: spec.stage().to_string(),
            config_yaml: m.config_yaml,
            data: m.data,
            out: m.out,
            steps: m.steps,
            nodes: m.nodes,
            min_nodes: m.min_nodes,
            dataloaders: m.dataloaders,
            collective: spec.collective.to_string(),
            eval_every: m.eval_every,
            checkpoint_every: m.checkpoint_every,
            resume: m.resume,
            device: m.device,
            checkpoint_url: m.checkpoint_url,
            max_restarts: m.max_restarts,
            placement_timeout_s: m.placement_timeout_s,
            ..Stored::default()
        };
        if let StageJob::Transformer(t) = &spec.stage_job {
            stored.vqgan = t.vqgan.clone();
            stored.cond = t.cond.to_string();
            stored.codes = t.codes.clone().unwrap_or_default();
            stored.val_codes = t.val_codes.clone().unwrap_or_default();
            stored.cond_vqgan = t.cond_vqgan.clone().unwrap_or_default();
        }
        stored
    }

    /// `text` as an enum, `empty` when it is empty.
    fn parse_or<T: std::str::FromStr<Err = String>>(
        text: &str,
        empty: T,
        field: &str,
    ) -> Result<T, String> {
        match text {
            "" => Ok(empty),
            t => t.parse().map_err(|e| format!("spec.{field}: {e}")),
        }
    }

    fn from_stored(s: Stored) -> Result<JobSpec, String> {
        let stage: Stage = s.stage.parse().map_err(|e| format!("spec.stage: {e}"))?;
        let stage_job = match stage {
            Stage::Vqgan => WireStageJob::VqganJob(wire::VqganJob {}),
            Stage::Transformer => WireStageJob::TransformerJob(wire::TransformerJob {
                vqgan: s.vqgan,
                cond: parse_or(&s.cond, Conditioning::None, "cond")?.to_wire(),
                codes: s.codes,
                val_codes: s.val_codes,
                cond_vqgan: s.cond_vqgan,
            }),
        };
        let m = wire::JobSpec {
            stage: stage.to_wire(),
            config_yaml: s.config_yaml,
            data: s.data,
            out: s.out,
            steps: s.steps,
            nodes: s.nodes,
            min_nodes: s.min_nodes,
            dataloaders: s.dataloaders,
            collective: parse_or(&s.collective, Collective::Ring, "collective")?.to_wire(),
            eval_every: s.eval_every,
            checkpoint_every: s.checkpoint_every,
            resume: s.resume,
            device: s.device,
            checkpoint_url: s.checkpoint_url,
            max_restarts: s.max_restarts,
            placement_timeout_s: s.placement_timeout_s,
            stage_job: Some(stage_job),
        };
        JobSpec::decode(m).map_err(|e| e.to_string())
    }

    pub fn serialize<S: Serializer>(spec: &JobSpec, s: S) -> Result<S::Ok, S::Error> {
        to_stored(spec).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<JobSpec, D::Error> {
        from_stored(Stored::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
