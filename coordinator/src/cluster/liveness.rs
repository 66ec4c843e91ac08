//! Which workers are gone: silent ones (no heartbeat), and ranks that show no progress
//! within the progress timeout while their heartbeat goes on (hung). Progress is a reported
//! step, or a change of the work counter a worker's heartbeat carries (its training thread
//! counts evaluation batches and other long work between steps).

use std::time::{Duration, Instant};

use super::{Cluster, JobState, STARTUP_FACTOR};

/// A rank's latest step and the latest sign of its work.
#[derive(Debug, Clone, Copy)]
pub(super) struct RankProgress {
    /// The furthest step it reported.
    step: u64,
    /// When it reported a step.
    stepped_at: Instant,
    /// When it last showed progress: a step, or work between steps.
    alive_at: Instant,
}

impl RankProgress {
    /// A rank just placed at `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            step: 0,
            stepped_at: now,
            alive_at: now,
        }
    }
}

impl Cluster {
    /// Drops workers silent for longer than `timeout`, and the workers of ranks that show
    /// no progress within the progress timeout (hung, though their heartbeat thread lives on);
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
    pub(super) fn note_progress(&mut self, job: &str, rank: usize, step: u64, now: Instant) {
        let Some(seen) = self
            .progress_seen
            .get_mut(job)
            .and_then(|s| s.get_mut(rank))
        else {
            return;
        };
        let before = *seen;
        seen.alive_at = now;
        if step <= before.step {
            return;
        }
        *seen = RankProgress {
            step,
            stepped_at: now,
            alive_at: now,
        };
        if rank == 0 && before.step > 0 {
            let per_step =
                now.duration_since(before.stepped_at).as_secs_f64() / (step - before.step) as f64;
            let smoothed = self.step_seconds.entry(job.to_string()).or_insert(per_step);
            *smoothed = 0.8 * *smoothed + 0.2 * per_step;
        }
    }

    /// Records `worker`'s work counter from its heartbeat: a change while it runs the current
    /// attempt of its job is progress of its rank (a long evaluation is not a hang).
    pub fn note_work(&mut self, worker: &str, work: u64, now: Instant) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.work == work {
            return;
        }
        w.work = work;
        let (Some(job), Some((busy_job, attempt, None))) = (&w.job, &w.busy) else {
            return;
        };
        let Some(record) = self.jobs.get(job) else {
            return;
        };
        if busy_job != job || record.attempt != *attempt || record.state != JobState::Running {
            return;
        }
        let rank = record.workers.iter().position(|id| id == worker);
        if let Some(seen) = rank.and_then(|r| self.progress_seen.get_mut(job)?.get_mut(r)) {
            seen.alive_at = now;
        }
    }

    /// Running jobs with ranks without progress past the progress timeout: (job, the lagging ranks,
    /// why). Of the silent ranks, those behind the furthest rank are blamed (the others wait
    /// for them in a collective); when all are level, all of them.
    fn hung(&self, now: Instant) -> Vec<(String, Vec<usize>, String)> {
        if self.progress_timeout.is_zero() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (id, seen) in &self.progress_seen {
            if self
                .jobs
                .get(id)
                .is_none_or(|j| j.state != JobState::Running)
            {
                continue;
            }
            let furthest = seen.iter().map(|s| s.step).max().unwrap_or(0);
            let scaled = self.step_seconds.get(id).map_or(0.0, |s| 20.0 * s);
            let mut limit = self.progress_timeout.max(Duration::from_secs_f64(scaled));
            if furthest == 0 {
                // Before the first step: start-up (loading, building, k-means) gets longer.
                limit *= STARTUP_FACTOR;
            }
            let silent: Vec<usize> = (0..seen.len())
                .filter(|&r| now.duration_since(seen[r].alive_at) > limit)
                .collect();
            if silent.is_empty() {
                continue;
            }
            let behind: Vec<usize> = silent
                .iter()
                .copied()
                .filter(|&r| seen[r].step < furthest)
                .collect();
            let blamed = if behind.is_empty() { silent } else { behind };
            let why = format!(
                "rank(s) {blamed:?} showed no progress (no step, no work) for {} s (hung; the limit is {} s): their worker(s) are dropped",
                now.duration_since(seen[blamed[0]].alive_at).as_secs(),
                limit.as_secs()
            );
            out.push((id.clone(), blamed, why));
        }
        out
    }
}
