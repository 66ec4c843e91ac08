//! The coordinator's state: the worker registry (heartbeats, devices, ring addresses), the
//! job queue, and the assignment of jobs to groups of workers. A job starts only when all
//! its ranks are placed; a worker that stops heartbeating fails its job's attempt, and the
//! job goes back to the queue to resume from its last checkpoint on the workers available
//! (at least `min_nodes`). Jobs survive restarts through [`Cluster::save`] / [`Cluster::load`].
//! Plain data, no I/O but the state file, no async: the gRPC service wraps it in a mutex.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use taming_proto::coordinator::{Assignment, Job, JobSpec, ProgressReport};
use taming_proto::device_kind;

/// Job states.
pub const PENDING: &str = "pending";
/// A job whose ranks are all placed and running.
pub const RUNNING: &str = "running";
/// Finished on every rank.
pub const SUCCEEDED: &str = "succeeded";
/// Given up (a rank failed and too few workers remain, or a rank reported an error).
pub const FAILED: &str = "failed";
/// Stopped by `coordinator cancel`.
pub const CANCELLED: &str = "cancelled";

/// A registered worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Assigned id.
    pub id: String,
    /// Name it gave (host name, pod name).
    pub name: String,
    /// Its devices (`cpu`, `cuda:0`, ...) and their memory.
    pub devices: Vec<(String, u64)>,
    /// Where it accepts its ring predecessor.
    pub ring_addr: String,
    /// Last heartbeat.
    pub seen: Instant,
    /// The job it runs, if any.
    pub job: Option<String>,
}

impl Worker {
    /// Whether it offers a device of `kind` (`cpu`, `cuda`, `vulkan`); every worker has a CPU.
    pub fn offers(&self, kind: &str) -> bool {
        kind == "cpu" || self.devices.iter().any(|(d, _)| device_kind(d) == kind)
    }
}

/// A job as the coordinator keeps it (persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: String,
    /// What it runs (the proto message, as JSON-able fields).
    pub spec: JobSpec,
    /// pending, running, succeeded, failed, cancelled.
    pub state: String,
    /// Attempts started.
    pub attempt: u32,
    /// Workers of the current attempt, by rank.
    pub workers: Vec<String>,
    /// Ranks of the current attempt that finished.
    pub done: Vec<u32>,
    /// Latest step reported.
    pub step: u64,
    /// Latest losses.
    pub losses: BTreeMap<String, f64>,
    /// Latest throughput (rank 0).
    pub images_per_s: f64,
    /// Why it failed or what it is waiting for.
    pub message: String,
    /// Losses reported so far, by step (thinned to at most [`HISTORY_POINTS`]).
    #[serde(default)]
    pub history: Vec<HistoryPoint>,
}

/// One reported step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// The step.
    pub step: u64,
    /// When it was reported, in seconds since the Unix epoch.
    pub at: f64,
    /// Its losses.
    pub losses: BTreeMap<String, f64>,
}

/// Most loss points a job keeps for its curves; beyond, every other point is dropped.
pub const HISTORY_POINTS: usize = 2048;

/// Refusals of requests, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A request field with an impossible value.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An id that is not known.
    #[error("unknown {what} `{id}`")]
    Unknown {
        /// worker or job.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The state file could not be read or written.
    #[error("state {}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Registry, queue and assignments.
#[derive(Debug, Default)]
pub struct Cluster {
    /// Registered workers by id.
    pub workers: BTreeMap<String, Worker>,
    /// Jobs by id.
    pub jobs: BTreeMap<String, JobRecord>,
    /// A failed attempt is restarted no sooner than this, so that workers that died with it
    /// have stopped heartbeating and are not placed again.
    pub restart_delay: Duration,
    not_before: BTreeMap<String, Instant>,
    next_worker: u64,
    next_job: u64,
}

/// Attempts before a job whose ranks keep failing is given up.
pub const MAX_ATTEMPTS: u32 = 8;

/// Most ranks a job may ask for.
pub const MAX_NODES: u32 = 4096;
const MAX_TEXT: usize = 1 << 20;

fn invalid(field: &'static str, reason: impl Into<String>) -> ClusterError {
    ClusterError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Cluster {
    /// Registers a worker and returns its id.
    pub fn register(
        &mut self,
        name: &str,
        devices: Vec<(String, u64)>,
        ring_addr: &str,
        now: Instant,
    ) -> Result<String, ClusterError> {
        if name.len() > 256 || ring_addr.len() > 256 || devices.len() > 64 {
            return Err(invalid(
                "register",
                "name, ring_addr (256 bytes) or devices (64) too long",
            ));
        }
        taming_proto::host_port(ring_addr).map_err(|e| invalid("ring_addr", e))?;
        self.next_worker += 1;
        let id = format!("w{:04}-{name}", self.next_worker);
        self.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                name: name.to_string(),
                devices,
                ring_addr: ring_addr.to_string(),
                seen: now,
                job: None,
            },
        );
        Ok(id)
    }

    /// Records a heartbeat; returns the jobs the worker must stop.
    pub fn heartbeat(&mut self, worker: &str, now: Instant) -> Result<Vec<String>, ClusterError> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| ClusterError::Unknown {
                what: "worker",
                id: worker.into(),
            })?;
        w.seen = now;
        Ok(w.job
            .iter()
            .filter(|j| self.jobs.get(*j).is_some_and(|j| j.state != RUNNING))
            .cloned()
            .collect())
    }

    /// Queues a job after checking its spec.
    pub fn submit(&mut self, spec: JobSpec) -> Result<String, ClusterError> {
        if spec.stage != "vqgan" && spec.stage != "transformer" {
            return Err(invalid(
                "spec.stage",
                format!("`{}` (vqgan or transformer)", spec.stage),
            ));
        }
        if spec.stage == "transformer" && spec.vqgan.is_empty() {
            return Err(invalid(
                "spec.vqgan",
                "stage-2 jobs name their first-stage VQGAN",
            ));
        }
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return Err(invalid(
                "spec.nodes",
                format!("{} not in 1..={MAX_NODES}", spec.nodes),
            ));
        }
        if spec.min_nodes > spec.nodes {
            return Err(invalid(
                "spec.min_nodes",
                format!("{} above nodes {}", spec.min_nodes, spec.nodes),
            ));
        }
        if spec.steps == 0 {
            return Err(invalid("spec.steps", "must be at least 1"));
        }
        if spec.out.is_empty() || spec.config_yaml.len() > MAX_TEXT || spec.dataloaders.len() > 256
        {
            return Err(invalid(
                "spec",
                "empty out, config over 1 MiB or over 256 dataloaders",
            ));
        }
        if !matches!(spec.collective.as_str(), "" | "ring" | "nccl") {
            return Err(invalid(
                "spec.collective",
                format!("`{}` (ring or nccl)", spec.collective),
            ));
        }
        self.next_job += 1;
        let id = format!("job-{:04}", self.next_job);
        let mut spec = spec;
        spec.min_nodes = spec.min_nodes.max(1);
        self.jobs.insert(
            id.clone(),
            JobRecord {
                id: id.clone(),
                spec,
                state: PENDING.into(),
                attempt: 0,
                workers: Vec::new(),
                done: Vec::new(),
                step: 0,
                losses: BTreeMap::new(),
                images_per_s: 0.0,
                message: String::new(),
                history: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Places pending jobs on idle workers, oldest job first. A first attempt waits for
    /// `nodes` workers; a restart takes what is there, down to `min_nodes`.
    pub fn schedule(&mut self, now: Instant) -> Vec<(String, Assignment)> {
        let mut out = Vec::new();
        self.not_before.retain(|_, t| *t > now);
        let pending: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.state == PENDING && !self.not_before.contains_key(&j.id))
            .map(|j| j.id.clone())
            .collect();
        for id in pending {
            let kind = device_kind(&self.jobs[&id].spec.device).to_string();
            let idle: Vec<String> = self
                .workers
                .values()
                .filter(|w| w.job.is_none() && w.offers(&kind))
                .map(|w| w.id.clone())
                .collect();
            let job = self.jobs.get_mut(&id).expect("listed");
            let need = if job.attempt == 0 {
                job.spec.nodes
            } else {
                job.spec.min_nodes
            } as usize;
            if idle.len() < need {
                job.message = format!(
                    "waiting for {need} idle worker(s) with a {kind} device; {} idle",
                    idle.len()
                );
                continue;
            }
            let take = idle.len().min(job.spec.nodes as usize);
            let chosen: Vec<String> = idle.into_iter().take(take).collect();
            let peers: Vec<String> = chosen
                .iter()
                .map(|w| self.workers[w].ring_addr.clone())
                .collect();
            let resume = job.attempt > 0 || job.spec.resume;
            job.attempt += 1;
            job.state = RUNNING.into();
            job.workers = chosen.clone();
            job.done.clear();
            job.message = format!("attempt {} on {} worker(s)", job.attempt, chosen.len());
            for (rank, w) in chosen.iter().enumerate() {
                self.workers.get_mut(w).expect("idle").job = Some(id.clone());
                out.push((
                    w.clone(),
                    Assignment {
                        job_id: id.clone(),
                        attempt: job.attempt,
                        rank: rank as u32,
                        world_size: chosen.len() as u32,
                        peers: peers.clone(),
                        spec: Some(job.spec.clone()),
                        resume,
                    },
                ));
            }
        }
        out
    }

    /// Records a progress report; returns whether the worker must stop.
    pub fn progress(&mut self, r: &ProgressReport) -> Result<bool, ClusterError> {
        if r.losses.len() > 64 || r.message.len() > 4096 {
            return Err(invalid(
                "progress",
                "over 64 losses or a message over 4 KiB",
            ));
        }
        let job = self
            .jobs
            .get_mut(&r.job_id)
            .ok_or_else(|| ClusterError::Unknown {
                what: "job",
                id: r.job_id.clone(),
            })?;
        if r.attempt != job.attempt || job.state != RUNNING {
            return Ok(true);
        }
        if r.rank == 0 && !r.losses.is_empty() {
            job.step = r.step;
            job.losses = r.losses.iter().map(|(k, v)| (k.clone(), *v)).collect();
            job.images_per_s = r.images_per_s;
            job.history.retain(|p| p.step < r.step);
            if job.history.len() >= HISTORY_POINTS {
                job.history = job.history.iter().step_by(2).cloned().collect();
            }
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            job.history.push(HistoryPoint {
                step: r.step,
                at,
                losses: job.losses.clone(),
            });
        }
        match r.state.as_str() {
            "succeeded" => {
                if !job.done.contains(&r.rank) {
                    job.done.push(r.rank);
                }
                self.release_worker(&r.worker_id);
                let job = self.jobs.get_mut(&r.job_id).expect("known");
                if job.done.len() == job.workers.len() {
                    job.state = SUCCEEDED.into();
                    job.message = format!("finished at step {}", job.step);
                }
            }
            "failed" if r.retryable && job.attempt < MAX_ATTEMPTS => {
                let message = format!("rank {} failed: {}", r.rank, r.message);
                self.fail_attempt(&r.job_id, &message);
            }
            "failed" => {
                job.state = FAILED.into();
                job.message = format!("rank {} failed: {}", r.rank, r.message);
                let workers = std::mem::take(&mut job.workers);
                workers.iter().for_each(|w| self.release_worker(w));
            }
            _ => {}
        }
        Ok(false)
    }

    /// Cancels a job; its workers are told at their next heartbeat or report.
    pub fn cancel(&mut self, id: &str) -> Result<String, ClusterError> {
        let job = self.jobs.get_mut(id).ok_or_else(|| ClusterError::Unknown {
            what: "job",
            id: id.into(),
        })?;
        if job.state == PENDING || job.state == RUNNING {
            job.state = CANCELLED.into();
            job.message = "cancelled".into();
            let workers = job.workers.clone();
            workers.iter().for_each(|w| self.release_worker(w));
        }
        Ok(self.jobs[id].state.clone())
    }

    /// Drops workers silent for longer than `timeout`; their jobs' attempts fail.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let dead: Vec<String> = self
            .workers
            .values()
            .filter(|w| now.duration_since(w.seen) > timeout)
            .map(|w| w.id.clone())
            .collect();
        for id in &dead {
            let worker = self.workers.remove(id).expect("listed");
            if let Some(job) = worker.job {
                self.fail_attempt(&job, &format!("worker {id} stopped heartbeating"));
            }
        }
        dead
    }

    /// Ends the current attempt of a running job: its workers are released and the job is
    /// queued again to resume from its last checkpoint.
    fn fail_attempt(&mut self, id: &str, why: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.state != RUNNING {
            return;
        }
        tracing::warn!(job = id, attempt = job.attempt, "attempt failed: {why}");
        job.state = PENDING.into();
        job.message = format!("restarting after: {why}");
        let workers = std::mem::take(&mut job.workers);
        self.not_before
            .insert(id.to_string(), Instant::now() + self.restart_delay);
        workers.iter().for_each(|w| self.release_worker(w));
    }

    fn release_worker(&mut self, id: &str) {
        if let Some(w) = self.workers.get_mut(id) {
            w.job = None;
        }
    }

    /// A job as the API shows it.
    pub fn job(&self, id: &str) -> Result<Job, ClusterError> {
        let j = self.jobs.get(id).ok_or_else(|| ClusterError::Unknown {
            what: "job",
            id: id.into(),
        })?;
        Ok(Job {
            job_id: j.id.clone(),
            state: j.state.clone(),
            spec: Some(j.spec.clone()),
            attempt: j.attempt,
            workers: j.workers.clone(),
            step: j.step,
            losses: j.losses.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            images_per_s: j.images_per_s,
            message: j.message.clone(),
        })
    }

    /// Writes the jobs to `dir/jobs.json` (temporary file, then rename).
    pub fn save(&self, dir: &Path) -> Result<(), ClusterError> {
        let path = dir.join("jobs.json");
        let err = |e: std::io::Error| ClusterError::State {
            path: path.clone(),
            reason: e.to_string(),
        };
        let json = serde_json::to_vec_pretty(&self.jobs.values().collect::<Vec<_>>())
            .expect("jobs serialize");
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(".jobs.json.tmp");
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
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
        for mut job in jobs {
            if job.state == RUNNING {
                job.state = PENDING.into();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: u32, min_nodes: u32) -> JobSpec {
        JobSpec {
            stage: "vqgan".into(),
            out: "runs/x".into(),
            steps: 10,
            nodes,
            min_nodes,
            ..Default::default()
        }
    }

    fn cluster_with(n: usize, now: Instant) -> (Cluster, Vec<String>) {
        let mut c = Cluster::default();
        let ids = (0..n)
            .map(|i| {
                c.register(
                    &format!("h{i}"),
                    vec![],
                    &format!("127.0.0.1:{}", 7000 + i),
                    now,
                )
                .unwrap()
            })
            .collect();
        (c, ids)
    }

    #[test]
    fn a_job_starts_only_when_all_its_ranks_are_placed() {
        let now = Instant::now();
        let (mut c, _) = cluster_with(2, now);
        let id = c.submit(spec(3, 2)).unwrap();
        assert!(c.schedule(now).is_empty());
        assert_eq!(c.jobs[&id].state, PENDING);
        c.register("h2", vec![], "127.0.0.1:7002", now).unwrap();
        let a = c.schedule(now);
        assert_eq!(a.len(), 3);
        assert_eq!(a.iter().map(|(_, a)| a.rank).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(
            a.iter()
                .all(|(_, a)| a.world_size == 3 && a.peers.len() == 3 && !a.resume)
        );
    }

    #[test]
    fn a_gpu_job_is_placed_only_on_workers_offering_that_device_kind() {
        let now = Instant::now();
        let (mut c, _) = cluster_with(2, now);
        let id = c
            .submit(JobSpec {
                device: "cuda".into(),
                ..spec(1, 1)
            })
            .unwrap();
        assert!(c.schedule(now).is_empty());
        assert!(
            c.jobs[&id].message.contains("with a cuda device"),
            "{}",
            c.jobs[&id].message
        );
        let gpu = c
            .register(
                "gpu",
                vec![("cpu".into(), 1 << 30), ("cuda:0".into(), 1 << 37)],
                "127.0.0.1:7009",
                now,
            )
            .unwrap();
        let a = c.schedule(now);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].0, gpu);
        let cpu_job = c.submit(spec(2, 2)).unwrap();
        assert_eq!(c.schedule(now).len(), 2, "cpu jobs run on any worker");
        assert_eq!(c.jobs[&cpu_job].state, RUNNING);
    }

    #[test]
    fn a_silent_worker_fails_the_attempt_and_the_job_resumes_on_fewer_workers() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(3, now);
        let id = c.submit(spec(3, 2)).unwrap();
        assert_eq!(c.schedule(now).len(), 3);
        let later = now + Duration::from_secs(10);
        c.heartbeat(&ids[0], later).unwrap();
        c.heartbeat(&ids[1], later).unwrap();
        assert_eq!(
            c.expire(later, Duration::from_secs(5)),
            vec![ids[2].clone()]
        );
        assert_eq!(c.jobs[&id].state, PENDING);
        let again = c.schedule(later);
        assert_eq!(again.len(), 2);
        assert!(
            again
                .iter()
                .all(|(_, a)| a.resume && a.attempt == 2 && a.world_size == 2)
        );
        // Reports of the old attempt are told to stop.
        let old = ProgressReport {
            job_id: id.clone(),
            attempt: 1,
            state: "running".into(),
            ..Default::default()
        };
        assert!(c.progress(&old).unwrap());
    }

    #[test]
    fn jobs_survive_a_restart_and_running_ones_resume() {
        let now = Instant::now();
        let (mut c, _) = cluster_with(1, now);
        let id = c.submit(spec(1, 1)).unwrap();
        c.schedule(now);
        let tmp = tempfile::tempdir().unwrap();
        c.save(tmp.path()).unwrap();
        let mut back = Cluster::load(tmp.path()).unwrap();
        assert_eq!(back.jobs[&id].state, PENDING);
        back.register("h", vec![], "127.0.0.1:9", now).unwrap();
        let a = back.schedule(now);
        assert!(a[0].1.resume);
        assert_eq!(back.submit(spec(1, 1)).unwrap(), "job-0002");
    }

    #[test]
    fn impossible_requests_name_the_field() {
        let mut c = Cluster::default();
        let e = c.submit(spec(0, 0)).unwrap_err().to_string();
        assert!(e.contains("spec.nodes"), "{e}");
        let e = c
            .submit(JobSpec {
                stage: "gan".into(),
                ..spec(1, 1)
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.stage"), "{e}");
        let e = c
            .register("x", vec![], "not an address", Instant::now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ring_addr"), "{e}");
    }
}
