//! Who may do what: a worker acts only for itself (its registration secret), and only the
//! ranks of a job's current attempt touch its NCCL rendezvous.

use taming_proto::auth::same_bytes;

use super::{Cluster, ClusterError, JobState};

impl Cluster {
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
        if j.state != JobState::Running
            || j.attempt != attempt
            || !ranks.iter().any(|w| w == worker)
        {
            return Err(ClusterError::Forbidden(format!(
                "worker `{worker}` is not {} of {job} attempt {attempt}",
                if any_rank { "a rank" } else { "rank 0" }
            )));
        }
        Ok(())
    }
}
