//! The coordinator's state: the worker registry (heartbeats, devices, ring addresses), the
//! job queue, and the assignment of jobs to groups of workers. A job starts only when all
//! its ranks are placed; a worker that stops heartbeating fails its job's attempt, and the
//! job goes back to the queue to resume from its last checkpoint on the workers available
//! (at least `min_nodes`). Jobs survive restarts through [`Cluster::save`] / [`Cluster::load`].
//! Plain data, no I/O but the state file, no async: the gRPC service wraps it in a mutex.
//! Submodules: `liveness` (silent and hung workers), `roles` (who may act for whom),
//! `state_file` (durable writes, rollback, loading).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use liveness::RankProgress;
use serde::{Deserialize, Serialize};
use state_file::float_text;
use taming_proto::job::{
    Assignment, Device, Job, JobSpec, JobState, ProgressReport, RankState, Registration,
};

/// A registered worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Assigned id.
    pub id: String,
    /// Name it gave (host name, pod name).
    pub name: String,
    /// Its devices (`cpu`, `cuda:0`, ...) and their memory.
    pub devices: Vec<(Device, u64)>,
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
    /// Its training thread's work counter, as its last heartbeat said.
    pub work: u64,
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
        kind == "cpu" || self.devices.iter().any(|(d, _)| d.kind() == kind)
    }
}

/// A job as the coordinator keeps it (persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: String,
    /// What it runs (stored as the flat fields of the first `JobSpec` message).
    #[serde(with = "state_file::stored_spec")]
    pub spec: JobSpec,
    /// Where it stands.
    pub state: JobState,
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

/// Refusals of requests (beyond a message's own fields, checked where it is decoded).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A request field with a value impossible in the cluster's state.
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
    /// A rank of a running job that shows no progress (no step, no work) for this long (or for 20 of its job's
    /// recent step times, when longer) is taken for hung: its worker is dropped and the
    /// attempt fails. Zero: never.
    pub progress_timeout: Duration,
    /// Per running job: each rank's latest step and signs of work.
    progress_seen: BTreeMap<String, Vec<RankProgress>>,
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

fn invalid(field: &'static str, reason: impl Into<String>) -> ClusterError {
    ClusterError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Cluster {
    /// Registers a worker and returns its id.
    pub fn register(&mut self, r: Registration, now: Instant) -> String {
        self.next_worker += 1;
        let id = format!("w{:04}-{}", self.next_worker, r.name);
        let session: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                name: r.name,
                devices: r.devices,
                ring_addr: r.ring_addr,
                seen: now,
                job: None,
                session,
                busy: None,
                work: 0,
            },
        );
        id
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
            jobs.get(job).is_none_or(|j| {
                j.state != JobState::Running || attempt.is_some_and(|a| a != j.attempt)
            })
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

    /// Queues a job (its spec checked where it was decoded) and returns its id.
    pub fn submit(&mut self, spec: JobSpec) -> String {
        self.next_job += 1;
        let id = format!("job-{:04}", self.next_job);
        self.jobs.insert(
            id.clone(),
            JobRecord {
                id: id.clone(),
                spec,
                state: JobState::Pending,
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
        id
    }

    /// Places pending jobs on idle workers, oldest job first. A first attempt waits for
    /// `nodes` workers; a restart takes what is there, down to `min_nodes`.
    pub fn schedule(&mut self, now: Instant) -> Vec<(String, Assignment)> {
        let mut out = Vec::new();
        self.not_before.retain(|_, t| *t > now);
        let jobs = &self.jobs;
        self.pending_since
            .retain(|id, _| jobs.get(id).is_some_and(|j| j.state == JobState::Pending));
        let pending: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Pending && !self.not_before.contains_key(&j.id))
            .map(|j| j.id.clone())
            .collect();
        for id in pending {
            let kind = self.jobs[&id].spec.device.kind().to_string();
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
                    job.state = JobState::Failed;
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
            let ring_secret = rand::random::<[u8; 32]>();
            job.attempt += 1;
            job.state = JobState::Running;
            job.workers = chosen.clone();
            job.done.clear();
            job.message = format!("attempt {} on {} worker(s)", job.attempt, chosen.len());
            self.progress_seen
                .insert(id.clone(), vec![RankProgress::new(now); chosen.len()]);
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
                        spec: job.spec.clone(),
                        resume,
                        ring_secret,
                    },
                ));
            }
        }
        out
    }

    /// Records a progress report; returns whether the worker must stop.
    pub fn progress(&mut self, r: &ProgressReport) -> Result<bool, ClusterError> {
        let job = self
            .jobs
            .get_mut(&r.job_id)
            .ok_or_else(|| ClusterError::Unknown {
                what: "job",
                id: r.job_id.clone(),
            })?;
        if r.attempt != job.attempt || job.state != JobState::Running {
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
            job.losses = r.losses.clone();
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
        match r.state {
            RankState::Succeeded => {
                if !job.done.contains(&r.rank) {
                    job.done.push(r.rank);
                }
                self.release_worker(&r.worker_id);
                let job = self.jobs.get_mut(&r.job_id).expect("known");
                if job.done.len() == job.workers.len() {
                    job.state = JobState::Succeeded;
                    job.message = format!("finished at step {}", job.step);
                    thin(&mut job.history, FINISHED_HISTORY_POINTS);
                }
            }
            RankState::Failed => {
                let message = format!("rank {} failed: {}", r.rank, r.message);
                if r.retryable {
                    self.fail_attempt(&r.job_id, &message);
                } else {
                    self.fail_job(&r.job_id, &message);
                }
            }
            RankState::Running => {}
        }
        Ok(false)
    }

    /// Cancels a job; its workers are told at their next heartbeat or report.
    pub fn cancel(&mut self, id: &str) -> Result<JobState, ClusterError> {
        let job = self.jobs.get_mut(id).ok_or_else(|| ClusterError::Unknown {
            what: "job",
            id: id.into(),
        })?;
        if !job.state.is_final() {
            job.state = JobState::Cancelled;
            job.message = "cancelled".into();
            let workers = job.workers.clone();
            workers.iter().for_each(|w| self.release_worker(w));
        }
        Ok(self.jobs[id].state)
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
        if job.state != JobState::Running {
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
        job.state = JobState::Pending;
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
        job.state = JobState::Failed;
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
            state: j.state,
            spec: j.spec.clone(),
            attempt: j.attempt,
            workers: j.workers.clone(),
            step: j.step,
            losses: j.losses.clone(),
            images_per_s: j.images_per_s,
            message: j.message.clone(),
            failures: j.failures.clone(),
        })
    }
}

/// Keeps why an attempt of `job` ended, with its number, dropping the oldest beyond
/// [`FAILURES_KEPT`].
fn record_failure(job: &mut JobRecord, why: &str) {
    job.failures.push(format!("attempt {}: {why}", job.attempt));
    let extra = job.failures.len().saturating_sub(FAILURES_KEPT);
    job.failures.drain(..extra);
}

mod liveness;
mod roles;
mod state_file;
#[cfg(test)]
mod tests;
