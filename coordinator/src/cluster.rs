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
use taming_proto::auth::same_bytes;
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
    /// The secret its calls carry (hex of 32 random bytes).
    pub session: String,
    /// The assignment (job, attempt) its last heartbeat said it still runs, and since when
    /// that attempt has been over (it was told to stop).
    pub busy: Option<(String, u32, Option<Instant>)>,
}

impl Worker {
    /// Free for a new assignment: none placed on it, and it has finished its last one.
    pub fn idle(&self) -> bool {
        self.job.is_none() && self.busy.is_none()
    }
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
    #[serde(with = "float_text::map")]
    pub losses: BTreeMap<String, f64>,
    /// Latest throughput (rank 0).
    #[serde(with = "float_text")]
    pub images_per_s: f64,
    /// Why it failed or what it is waiting for.
    pub message: String,
    /// Losses reported so far, by step (thinned to at most [`HISTORY_POINTS`]).
    #[serde(default)]
    pub history: Vec<HistoryPoint>,
    /// Why each ended attempt ended, oldest first (the latest [`FAILURES_KEPT`]).
    #[serde(default)]
    pub failures: Vec<String>,
    /// Failed attempts so far (each one restarted the job, but the last when it failed).
    #[serde(default)]
    pub failed_attempts: u32,
}

impl JobRecord {
    /// Restarts allowed after failed attempts (the spec's, else [`DEFAULT_MAX_RESTARTS`]).
    pub fn max_restarts(&self) -> u32 {
        self.spec.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS)
    }
}

/// One reported step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// The step.
    pub step: u64,
    /// When it was reported, in seconds since the Unix epoch.
    pub at: f64,
    /// Its losses.
    #[serde(with = "float_text::map")]
    pub losses: BTreeMap<String, f64>,
}

/// Most loss points a job keeps for its curves; beyond, every other point is dropped.
pub const HISTORY_POINTS: usize = 2048;

/// Loss points a finished job keeps (its run folder's metrics.csv has every step): the state
/// file grows by at most this much per job.
pub const FINISHED_HISTORY_POINTS: usize = 256;

/// Every k-th point and the last, at most `max`.
fn thin(history: &mut Vec<HistoryPoint>, max: usize) {
    if history.len() <= max {
        return;
    }
    let every = history.len().div_ceil(max - 1);
    let last = history.pop().expect("not empty");
    *history = history.iter().step_by(every).cloned().collect();
    history.push(last);
}

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
    /// A caller acting for another worker, or outside its job.
    #[error("{0}")]
    Forbidden(String),
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
    pending_since: BTreeMap<String, Instant>,
    /// The jobs as last written to the state file (what a failed save rolls back to).
    saved: Option<Vec<u8>>,
    /// A rank of a running job that reports no step for this long (or for 20 of its job's
    /// recent step times, when longer) is taken for hung: its worker is dropped and the
    /// attempt fails. Zero: never.
    pub progress_timeout: Duration,
    /// Per running job: each rank's latest reported step and when it came.
    progress_seen: BTreeMap<String, Vec<(u64, Instant)>>,
    /// Per running job: seconds per step of rank 0, smoothed.
    step_seconds: BTreeMap<String, f64>,
    next_worker: u64,
    next_job: u64,
}

/// Restarts after failed attempts before a job is given up, when its spec does not say (as
/// torchrun's `--max-restarts` default).
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// How many progress timeouts an attempt may take before its first step.
pub const STARTUP_FACTOR: u32 = 3;

/// Attempt failures a job keeps for `status`.
pub const FAILURES_KEPT: usize = 16;

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
        let session: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                name: name.to_string(),
                devices,
                ring_addr: ring_addr.to_string(),
                seen: now,
                job: None,
                session,
                busy: None,
            },
        );
        Ok(id)
    }

    /// Checks that a call made with `session` is worker `id`'s own.
    pub fn authorize(&self, id: &str, session: &str) -> Result<(), ClusterError> {
        match self.workers.get(id) {
            Some(w) if same_bytes(w.session.as_bytes(), session.as_bytes()) => Ok(()),
            Some(_) => Err(ClusterError::Forbidden(format!(
                "a call for worker `{id}` without its session"
            ))),
            None => Err(ClusterError::Unknown {
                what: "worker",
                id: id.into(),
            }),
        }
    }

    /// The worker a session belongs to.
    pub fn session_owner(&self, session: &str) -> Option<&str> {
        self.workers
            .values()
            .find(|w| same_bytes(w.session.as_bytes(), session.as_bytes()))
            .map(|w| w.id.as_str())
    }

    /// Checks that `worker` runs rank 0 (or, with `any_rank`, any rank) of the current
    /// attempt of a running `job`: who may publish or fetch the attempt's NCCL id.
    pub fn check_rank(
        &self,
        worker: &str,
        job: &str,
        attempt: u32,
        any_rank: bool,
    ) -> Result<(), ClusterError> {
        let j = self.jobs.get(job).ok_or_else(|| ClusterError::Unknown {
            what: "job",
            id: job.into(),
        })?;
        let ranks = if any_rank {
            &j.workers[..]
        } else {
            &j.workers[..j.workers.len().min(1)]
        };
        if j.state != RUNNING || j.attempt != attempt || !ranks.iter().any(|w| w == worker) {
            return Err(ClusterError::Forbidden(format!(
                "worker `{worker}` is not {} of {job} attempt {attempt}",
                if any_rank { "a rank" } else { "rank 0" }
            )));
        }
        Ok(())
    }

    /// Records a heartbeat, with the assignment the worker still runs (`None`: none);
    /// returns the jobs the worker must stop: its job when that is no longer running, and an
    /// assignment of an attempt that has ended.
    pub fn heartbeat(
        &mut self,
        worker: &str,
        busy: Option<(String, u32)>,
        now: Instant,
    ) -> Result<Vec<String>, ClusterError> {
        let jobs = &self.jobs;
        let ended = |job: &str, attempt: Option<u32>| {
            jobs.get(job)
                .is_none_or(|j| j.state != RUNNING || attempt.is_some_and(|a| a != j.attempt))
        };
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| ClusterError::Unknown {
                what: "worker",
                id: worker.into(),
            })?;
        w.seen = now;
        let before = w.busy.take();
        w.busy = busy.map(|(job, attempt)| {
            let over_since = match before {
                Some((j, a, since)) if j == job && a == attempt => since,
                _ => None,
            };
            let over = ended(&job, Some(attempt)).then(|| over_since.unwrap_or(now));
            (job, attempt, over)
        });
        let mut stop: Vec<String> = w.job.iter().filter(|j| ended(j, None)).cloned().collect();
        if let Some((job, attempt, _)) = &w.busy
            && ended(job, Some(*attempt))
            && !stop.contains(job)
        {
            stop.push(job.clone());
        }
        Ok(stop)
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
                failures: Vec::new(),
                failed_attempts: 0,
            },
        );
        Ok(id)
    }

    /// Places pending jobs on idle workers, oldest job first. A first attempt waits for
    /// `nodes` workers; a restart takes what is there, down to `min_nodes`.
    pub fn schedule(&mut self, now: Instant) -> Vec<(String, Assignment)> {
        let mut out = Vec::new();
        self.not_before.retain(|_, t| *t > now);
        let jobs = &self.jobs;
        self.pending_since
            .retain(|id, _| jobs.get(id).is_some_and(|j| j.state == PENDING));
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
                .filter(|w| w.idle() && w.offers(&kind))
                .map(|w| w.id.clone())
                .collect();
            let job = self.jobs.get_mut(&id).expect("listed");
            let need = if job.attempt == 0 {
                job.spec.nodes
            } else {
                job.spec.min_nodes
            } as usize;
            if idle.len() < need {
                let since = *self.pending_since.entry(id.clone()).or_insert(now);
                let waited = now.duration_since(since).as_secs();
                let waiting = format!(
                    "waiting for {need} idle worker(s) with a {kind} device; {} idle",
                    idle.len()
                );
                let limit = job.spec.placement_timeout_s;
                if limit > 0 && waited >= limit {
                    job.state = FAILED.into();
                    job.message = format!("not placed within {limit} s: {waiting}");
                    self.pending_since.remove(&id);
                } else if waited > 0 {
                    job.message = format!("pending for {waited} s: {waiting}");
                } else {
                    job.message = waiting;
                }
                continue;
            }
            self.pending_since.remove(&id);
            let take = idle.len().min(job.spec.nodes as usize);
            let chosen: Vec<String> = idle.into_iter().take(take).collect();
            let peers: Vec<String> = chosen
                .iter()
                .map(|w| self.workers[w].ring_addr.clone())
                .collect();
            let resume = job.attempt > 0 || job.spec.resume;
            let ring_secret = rand::random::<[u8; 32]>().to_vec();
            job.attempt += 1;
            job.state = RUNNING.into();
            job.workers = chosen.clone();
            job.done.clear();
            job.message = format!("attempt {} on {} worker(s)", job.attempt, chosen.len());
            self.progress_seen
                .insert(id.clone(), vec![(0, now); chosen.len()]);
            self.step_seconds.remove(&id);
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
                        ring_secret: ring_secret.clone(),
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
        if job.workers.get(r.rank as usize) != Some(&r.worker_id) {
            return Err(invalid(
                "progress.rank",
                format!(
                    "worker `{}` is not rank {} of {} attempt {}",
                    r.worker_id, r.rank, r.job_id, r.attempt
                ),
            ));
        }
        self.note_progress(&r.job_id, r.rank as usize, r.step, Instant::now());
        let job = self.jobs.get_mut(&r.job_id).expect("known");
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
                    thin(&mut job.history, FINISHED_HISTORY_POINTS);
                }
            }
            "failed" => {
                let message = format!("rank {} failed: {}", r.rank, r.message);
                if r.retryable {
                    self.fail_attempt(&r.job_id, &message);
                } else {
                    self.fail_job(&r.job_id, &message);
                }
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

    /// Drops workers silent for longer than `timeout`, and the workers of ranks that report
    /// no step within the progress timeout (hung, though their heartbeat thread lives on);
    /// their jobs' attempts fail.
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
        let mut dropped = dead;
        for (job, ranks, why) in self.hung(now) {
            for rank in ranks {
                let worker = self.jobs[&job].workers.get(rank).cloned();
                if let Some(w) = worker.and_then(|w| self.workers.remove(&w)) {
                    dropped.push(w.id);
                }
            }
            self.fail_attempt(&job, &why);
        }
        dropped
    }

    /// Records that `rank` of `job` reported `step` at `now`; rank 0's reports also time the
    /// job's steps.
    fn note_progress(&mut self, job: &str, rank: usize, step: u64, now: Instant) {
        let Some(seen) = self
            .progress_seen
            .get_mut(job)
            .and_then(|s| s.get_mut(rank))
        else {
            return;
        };
        let (last_step, last_at) = *seen;
        *seen = (step.max(last_step), now);
        if rank == 0 && step > last_step && last_step > 0 {
            let per_step = now.duration_since(last_at).as_secs_f64() / (step - last_step) as f64;
            let smoothed = self.step_seconds.entry(job.to_string()).or_insert(per_step);
            *smoothed = 0.8 * *smoothed + 0.2 * per_step;
        }
    }

    /// Running jobs with ranks silent past the progress timeout: (job, the lagging ranks,
    /// why). Of the silent ranks, those behind the furthest rank are blamed (the others wait
    /// for them in a collective); when all are level, all of them.
    fn hung(&self, now: Instant) -> Vec<(String, Vec<usize>, String)> {
        if self.progress_timeout.is_zero() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (id, seen) in &self.progress_seen {
            if self.jobs.get(id).is_none_or(|j| j.state != RUNNING) {
                continue;
            }
            let furthest = seen.iter().map(|s| s.0).max().unwrap_or(0);
            let scaled = self.step_seconds.get(id).map_or(0.0, |s| 20.0 * s);
            let mut limit = self.progress_timeout.max(Duration::from_secs_f64(scaled));
            if furthest == 0 {
                // Before the first step: start-up (loading, building, k-means) gets longer.
                limit *= STARTUP_FACTOR;
            }
            let silent: Vec<usize> = (0..seen.len())
                .filter(|&r| now.duration_since(seen[r].1) > limit)
                .collect();
            if silent.is_empty() {
                continue;
            }
            let behind: Vec<usize> = silent
                .iter()
                .copied()
                .filter(|&r| seen[r].0 < furthest)
                .collect();
            let blamed = if behind.is_empty() { silent } else { behind };
            let why = format!(
                "rank(s) {blamed:?} reported no step for {} s (hung; the limit is {} s): their worker(s) are dropped",
                now.duration_since(seen[blamed[0]].1).as_secs(),
                limit.as_secs()
            );
            out.push((id.clone(), blamed, why));
        }
        out
    }

    /// Drops the workers registered under `name` (a process the local mini-cluster saw exit,
    /// `why` saying how); a job one of them ran fails its attempt. Returns whether any was
    /// registered.
    pub fn worker_exited(&mut self, name: &str, why: &str) -> bool {
        let gone: Vec<Worker> = self
            .workers
            .values()
            .filter(|w| w.name == name)
            .cloned()
            .collect();
        for w in &gone {
            self.workers.remove(&w.id);
            if let Some(job) = &w.job {
                self.fail_attempt(job, why);
            }
        }
        !gone.is_empty()
    }

    /// Ends the current attempt of a running job: its workers are released and the job is
    /// queued again to resume from its last checkpoint, or fails once it has used its
    /// restarts.
    fn fail_attempt(&mut self, id: &str, why: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.state != RUNNING {
            return;
        }
        tracing::warn!(job = id, attempt = job.attempt, "attempt failed: {why}");
        job.failed_attempts += 1;
        let (used, max) = (job.failed_attempts, job.max_restarts());
        if used > max {
            let why = format!("failed after {max} restart(s): {why}");
            self.fail_job(id, &why);
            return;
        }
        record_failure(job, why);
        job.state = PENDING.into();
        job.message = format!("restarting ({used} of {max}) after: {why}");
        let workers = std::mem::take(&mut job.workers);
        self.not_before
            .insert(id.to_string(), Instant::now() + self.restart_delay);
        workers.iter().for_each(|w| self.release_worker(w));
    }

    /// Fails a job for good with `why`, releasing its workers.
    pub fn fail_job(&mut self, id: &str, why: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        tracing::error!(job = id, attempt = job.attempt, "job failed: {why}");
        record_failure(job, why);
        job.state = FAILED.into();
        job.message = why.to_string();
        thin(&mut job.history, FINISHED_HISTORY_POINTS);
        let workers = std::mem::take(&mut job.workers);
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
            failures: j.failures.clone(),
        })
    }

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
                .is_some_and(|j| j.state == RUNNING && j.workers.contains(&w.id));
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

/// Writes `dir/jobs.json` through a flushed temporary file and a rename, then flushes the
/// directory.
fn write_durably(dir: &Path, json: &[u8]) -> Result<(), ClusterError> {
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
mod float_text {
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

/// Keeps why an attempt of `job` ended, with its number, dropping the oldest beyond
/// [`FAILURES_KEPT`].
fn record_failure(job: &mut JobRecord, why: &str) {
    job.failures.push(format!("attempt {}: {why}", job.attempt));
    let extra = job.failures.len().saturating_sub(FAILURES_KEPT);
    job.failures.drain(..extra);
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
        let secret = &a[0].1.ring_secret;
        assert_eq!(secret.len(), 32);
        assert!(
            a.iter().all(|(_, a)| &a.ring_secret == secret),
            "one secret per attempt"
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
        c.heartbeat(&ids[0], None, later).unwrap();
        c.heartbeat(&ids[1], None, later).unwrap();
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
    fn a_job_failing_past_its_restarts_fails_with_every_reason_kept() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(1, now);
        let id = c
            .submit(JobSpec {
                max_restarts: Some(1),
                ..spec(1, 1)
            })
            .unwrap();
        let failed = |attempt| ProgressReport {
            worker_id: ids[0].clone(),
            job_id: id.clone(),
            attempt,
            state: "failed".into(),
            message: "panicked: boom".into(),
            retryable: true,
            ..Default::default()
        };
        assert_eq!(c.schedule(now).len(), 1);
        c.progress(&failed(1)).unwrap();
        assert_eq!(c.jobs[&id].state, PENDING);
        assert!(
            c.jobs[&id]
                .message
                .starts_with("restarting (1 of 1) after: rank 0 failed: panicked")
        );
        assert_eq!(c.schedule(now + Duration::from_secs(1)).len(), 1);
        c.progress(&failed(2)).unwrap();
        let job = c.job(&id).unwrap();
        assert_eq!(job.state, FAILED);
        assert_eq!(
            job.message,
            "failed after 1 restart(s): rank 0 failed: panicked: boom"
        );
        assert_eq!(job.failures.len(), 2, "{:?}", job.failures);
        assert!(job.failures[0].starts_with("attempt 1: rank 0 failed: panicked: boom"));
        assert!(c.workers[&ids[0]].job.is_none(), "the worker is free again");
    }

    #[test]
    fn an_exited_worker_fails_its_attempt_at_once() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(1, now);
        let id = c.submit(spec(1, 1)).unwrap();
        assert_eq!(c.schedule(now).len(), 1);
        assert!(c.worker_exited("h0", "killed by signal 9 (SIGKILL)"));
        assert!(
            !c.workers.contains_key(&ids[0]),
            "dropped from the registry"
        );
        let job = &c.jobs[&id];
        assert_eq!(job.state, PENDING);
        assert!(
            job.message.contains("killed by signal 9"),
            "{}",
            job.message
        );
        assert!(
            !c.worker_exited("h0", "again"),
            "nothing left under that name"
        );
    }

    #[test]
    fn a_rank_that_stops_reporting_is_dropped_and_the_job_restarts_on_the_rest() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(3, now);
        c.progress_timeout = Duration::from_secs(60);
        let id = c.submit(spec(2, 1)).unwrap();
        let a = c.schedule(now);
        let report = |rank: usize, step| ProgressReport {
            worker_id: a[rank].0.clone(),
            job_id: id.clone(),
            attempt: 1,
            rank: rank as u32,
            step,
            state: "running".into(),
            ..Default::default()
        };
        c.progress(&report(0, 1)).unwrap();
        c.progress(&report(1, 1)).unwrap();
        c.progress(&report(0, 2)).unwrap();
        // Rank 1 hangs at step 1, rank 0 waits for it in the all-reduce of step 3.
        let later = now + Duration::from_secs(120);
        for w in &ids {
            c.heartbeat(w, None, later).unwrap();
        }
        let dropped = c.expire(later, Duration::from_secs(10));
        assert_eq!(dropped, vec![a[1].0.clone()], "only the lagging rank");
        let job = &c.jobs[&id];
        assert_eq!(job.state, PENDING);
        assert!(
            job.message.contains("rank(s) [1] reported no step"),
            "{}",
            job.message
        );
        let again = c.schedule(later + Duration::from_secs(1));
        assert_eq!(again.len(), 2, "on the two workers left");
        assert!(again.iter().all(|(w, _)| *w != a[1].0));
    }

    #[test]
    fn a_worker_acts_only_for_itself_and_only_rank_0_publishes_the_nccl_id() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(2, now);
        let own = c.workers[&ids[0]].session.clone();
        let other = c.workers[&ids[1]].session.clone();
        assert_eq!(own.len(), 64);
        assert_ne!(own, other);
        c.authorize(&ids[0], &own).unwrap();
        let e = c.authorize(&ids[0], &other).unwrap_err();
        assert!(matches!(e, ClusterError::Forbidden(_)), "{e}");
        assert!(c.authorize(&ids[0], "").is_err());
        assert_eq!(c.session_owner(&other), Some(ids[1].as_str()));
        let id = c.submit(spec(2, 2)).unwrap();
        let a = c.schedule(now);
        let (rank0, rank1) = (&a[0].0, &a[1].0);
        c.check_rank(rank0, &id, 1, false).unwrap();
        assert!(
            c.check_rank(rank1, &id, 1, false).is_err(),
            "rank 1 cannot publish"
        );
        c.check_rank(rank1, &id, 1, true).unwrap();
        assert!(
            c.check_rank(rank0, &id, 2, true).is_err(),
            "another attempt"
        );
    }

    #[test]
    fn start_up_gets_longer_than_a_step_before_a_rank_is_taken_for_hung() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(1, now);
        c.progress_timeout = Duration::from_secs(60);
        let id = c.submit(spec(1, 1)).unwrap();
        c.schedule(now);
        let alive = |c: &mut Cluster, t| c.heartbeat(&ids[0], None, t).unwrap();
        let t = now + Duration::from_secs(120);
        alive(&mut c, t);
        assert!(
            c.expire(t, Duration::from_secs(10)).is_empty(),
            "still starting"
        );
        let t = now + Duration::from_secs(181);
        alive(&mut c, t);
        assert_eq!(c.expire(t, Duration::from_secs(10)), vec![ids[0].clone()]);
        assert!(
            c.jobs[&id].message.contains("the limit is 180 s"),
            "{}",
            c.jobs[&id].message
        );
    }

    #[test]
    fn a_worker_still_running_an_ended_attempt_is_told_to_stop_and_not_placed() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(2, now);
        c.progress_timeout = Duration::from_secs(60);
        let id = c.submit(spec(2, 1)).unwrap();
        let a = c.schedule(now);
        let busy = || Some((id.clone(), 1));
        for (w, _) in &a {
            c.heartbeat(w, busy(), now).unwrap();
        }
        // Rank 0 fails; rank 1 still runs attempt 1 (stuck in a collective, or hung).
        let failed = ProgressReport {
            worker_id: a[0].0.clone(),
            job_id: id.clone(),
            attempt: 1,
            rank: 0,
            state: "failed".into(),
            retryable: true,
            ..Default::default()
        };
        c.progress(&failed).unwrap();
        let t = now + Duration::from_secs(1);
        c.heartbeat(&a[0].0, None, t).unwrap();
        let stop = c.heartbeat(&a[1].0, busy(), t).unwrap();
        assert_eq!(stop, vec![id.clone()], "told to stop the ended attempt");
        let again = c.schedule(t);
        assert_eq!(again.len(), 1, "placed on the worker that finished only");
        assert_eq!(again[0].0, a[0].0);
        assert!(
            c.workers[&a[1].0]
                .busy
                .as_ref()
                .is_some_and(|b| b.2 == Some(t))
        );
        // Once it has finished, it is idle again.
        let later = t + Duration::from_secs(30);
        c.heartbeat(&a[1].0, None, later).unwrap();
        assert!(c.workers[&a[1].0].idle());
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn a_report_for_another_workers_rank_is_refused() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(2, now);
        let id = c.submit(spec(2, 2)).unwrap();
        let a = c.schedule(now);
        let other = if a[0].0 == ids[0] { &ids[1] } else { &ids[0] };
        let forged = ProgressReport {
            worker_id: other.clone(),
            job_id: id.clone(),
            attempt: 1,
            rank: 0,
            state: "failed".into(),
            ..Default::default()
        };
        let e = c.progress(&forged).unwrap_err().to_string();
        assert!(e.contains("progress.rank"), "{e}");
        assert_eq!(c.jobs[&id].state, RUNNING);
    }

    #[test]
    fn a_job_not_placed_within_its_timeout_fails_saying_so() {
        let now = Instant::now();
        let mut c = Cluster::default();
        let id = c
            .submit(JobSpec {
                placement_timeout_s: 5,
                ..spec(2, 2)
            })
            .unwrap();
        c.schedule(now);
        c.schedule(now + Duration::from_secs(3));
        assert_eq!(c.jobs[&id].state, PENDING);
        assert!(
            c.jobs[&id]
                .message
                .starts_with("pending for 3 s: waiting for 2 idle")
        );
        c.schedule(now + Duration::from_secs(5));
        let job = &c.jobs[&id];
        assert_eq!(job.state, FAILED);
        assert_eq!(
            job.message,
            "not placed within 5 s: waiting for 2 idle worker(s) with a cpu device; 0 idle"
        );
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
    fn non_finite_losses_are_saved_and_read_back() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(1, now);
        let id = c.submit(spec(1, 1)).unwrap();
        c.schedule(now);
        let report = ProgressReport {
            worker_id: ids[0].clone(),
            job_id: id.clone(),
            attempt: 1,
            step: 7,
            losses: [("total".into(), f64::NAN), ("g".into(), f64::NEG_INFINITY)].into(),
            images_per_s: f64::INFINITY,
            state: "running".into(),
            ..Default::default()
        };
        c.progress(&report).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        c.save(tmp.path()).unwrap();
        let back = Cluster::load(tmp.path()).unwrap();
        let job = &back.jobs[&id];
        assert!(job.losses["total"].is_nan() && job.history[0].losses["total"].is_nan());
        assert_eq!(job.losses["g"], f64::NEG_INFINITY);
        assert_eq!(job.images_per_s, f64::INFINITY);
        // A state file written with nulls (how serde_json writes NaN) loads too.
        let text = std::fs::read_to_string(tmp.path().join("jobs.json")).unwrap();
        std::fs::write(
            tmp.path().join("jobs.json"),
            text.replace("\"NaN\"", "null"),
        )
        .unwrap();
        assert!(Cluster::load(tmp.path()).unwrap().jobs[&id].losses["total"].is_nan());
    }

    #[test]
    fn a_failed_save_rolls_the_jobs_back_to_what_is_on_disk() {
        let now = Instant::now();
        let (mut c, ids) = cluster_with(1, now);
        let tmp = tempfile::tempdir().unwrap();
        c.save(tmp.path()).unwrap();
        let id = c.submit(spec(1, 1)).unwrap();
        assert_eq!(c.schedule(now).len(), 1);
        // A directory where the temporary file goes: the write fails (even as root).
        std::fs::create_dir(tmp.path().join(".jobs.json.tmp")).unwrap();
        let e = c.save(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("jobs.json"), "{e}");
        c.rollback();
        assert!(!c.jobs.contains_key(&id), "the unsaved job is gone");
        assert!(c.workers[&ids[0]].job.is_none(), "its worker is idle again");
        assert!(Cluster::load(tmp.path()).unwrap().jobs.is_empty());
    }

    #[test]
    fn a_finished_job_keeps_a_thinned_loss_history_with_its_last_point() {
        let point = |step| HistoryPoint {
            step,
            at: 0.0,
            losses: BTreeMap::new(),
        };
        let mut h: Vec<HistoryPoint> = (1..=2000).map(point).collect();
        thin(&mut h, FINISHED_HISTORY_POINTS);
        assert!(h.len() <= FINISHED_HISTORY_POINTS, "{}", h.len());
        assert_eq!((h[0].step, h.last().unwrap().step), (1, 2000));
        assert!(h.windows(2).all(|w| w[0].step < w[1].step));
        let mut short: Vec<HistoryPoint> = (1..=10).map(point).collect();
        thin(&mut short, FINISHED_HISTORY_POINTS);
        assert_eq!(short.len(), 10);
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
