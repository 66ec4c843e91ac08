//! The coordinator's gRPC service around [`Cluster`]: every change is followed by scheduling
//! (assignments go to the workers' watch streams) and by saving the jobs under the state
//! directory; a monitor expires silent workers every second.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taming_proto::coordinator::coordinator_server::{Coordinator, CoordinatorServer};
use taming_proto::coordinator::*;
use taming_proto::job;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, ClusterError};
use taming_proto::auth::RequireToken;

/// The progress timeout of `coordinator serve` and the local mini-cluster, in seconds.
pub const DEFAULT_PROGRESS_TIMEOUT_S: u64 = 300;

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where jobs are kept across restarts.
    pub state_dir: PathBuf,
    /// A worker silent this long is dropped and its job's attempt fails.
    pub heartbeat_timeout: Duration,
    /// Interval the workers are asked to heartbeat at.
    pub heartbeat_interval: Duration,
    /// Required cluster token.
    pub token: Option<String>,
    /// A rank that shows no progress for this long (or 20 step times) is taken for hung; zero:
    /// never.
    pub progress_timeout: Duration,
    /// Running jobs' step reports are written to the state file at most this often (the
    /// monitor's tick writes what is left); every other change is written at once.
    pub report_save_interval: Duration,
}

/// What the coordinator knows at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Registered workers.
    pub workers: Vec<crate::cluster::Worker>,
    /// Every job, oldest first.
    pub jobs: Vec<crate::cluster::JobRecord>,
    /// Silence after which a worker is dropped.
    pub heartbeat_timeout: Duration,
}

type AssignmentTx = mpsc::Sender<Result<Assignment, Status>>;

/// The worker session a call carries (empty when none).
fn session_of<T>(r: &Request<T>) -> String {
    r.metadata()
        .get(taming_proto::auth::SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

struct Shared {
    cluster: Mutex<Cluster>,
    watchers: Mutex<HashMap<String, AssignmentTx>>,
    undelivered: Mutex<HashMap<String, Vec<Assignment>>>,
    ids: Mutex<HashMap<(String, u32), Vec<u8>>>,
    /// When the state file was last written.
    saved_at: Mutex<Instant>,
    opts: ServeOptions,
}

/// How often running jobs' step reports are written to the state file by default.
pub const REPORT_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// The service.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

fn status(e: ClusterError) -> Status {
    match e {
        ClusterError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        ClusterError::Unknown { .. } => Status::not_found(e.to_string()),
        ClusterError::State { .. } => Status::internal(e.to_string()),
        ClusterError::Forbidden(_) => Status::permission_denied(e.to_string()),
    }
}

impl CoordinatorService {
    /// A service with the jobs saved in `opts.state_dir`.
    pub fn new(opts: ServeOptions) -> Result<Self, ClusterError> {
        let mut cluster = Cluster::load(&opts.state_dir)?;
        cluster.restart_delay = opts.heartbeat_timeout + Duration::from_secs(1);
        cluster.progress_timeout = opts.progress_timeout;
        Ok(Self {
            shared: Arc::new(Shared {
                cluster: Mutex::new(cluster),
                saved_at: Mutex::new(Instant::now()),
                watchers: Mutex::default(),
                undelivered: Mutex::default(),
                ids: Mutex::default(),
                opts,
            }),
        })
    }

    /// A copy of the registry and the jobs, for the status page and the metrics.
    pub fn snapshot(&self) -> Snapshot {
        let cluster = self.shared.cluster.lock().expect("cluster lock");
        Snapshot {
            workers: cluster.workers.values().cloned().collect(),
            jobs: cluster.jobs.values().cloned().collect(),
            heartbeat_timeout: self.shared.opts.heartbeat_timeout,
        }
    }

    /// The tonic server with the token check.
    pub fn into_server(self) -> InterceptedService<CoordinatorServer<Self>, RequireToken> {
        let token = RequireToken::new(self.shared.opts.token.clone());
        InterceptedService::new(CoordinatorServer::new(self), token)
    }

    /// Runs `f` on the cluster, schedules, saves, then dispatches; when the save fails the
    /// change is rolled back and the caller gets the error.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut Cluster) -> Result<T, ClusterError>,
    ) -> Result<T, Status> {
        self.change_with(false, f)
    }

    /// [`Self::change`]; a `report` (a running job's step) that places nothing is written
    /// only when the last write is `report_save_interval` old.
    fn change_with<T>(
        &self,
        report: bool,
        f: impl FnOnce(&mut Cluster) -> Result<T, ClusterError>,
    ) -> Result<T, Status> {
        let (out, assignments) = {
            let mut c = self.shared.cluster.lock().expect("cluster");
            let out = f(&mut c).map_err(status)?;
            let assignments = c.schedule(Instant::now());
            let mut saved_at = self.shared.saved_at.lock().expect("saved_at");
            let interval = self.shared.opts.report_save_interval;
            if report && assignments.is_empty() && saved_at.elapsed() < interval {
                return Ok(out);
            }
            *saved_at = Instant::now();
            if let Err(e) = c.save(&self.shared.opts.state_dir) {
                // Nothing is dispatched that the state file does not hold.
                tracing::error!("{e}; the change is undone");
                c.rollback();
                return Err(status(e));
            }
            (out, assignments)
        };
        self.dispatch(assignments);
        Ok(out)
    }

    fn dispatch(&self, assignments: Vec<(String, job::Assignment)>) {
        let watchers = self.shared.watchers.lock().expect("watchers");
        let mut undelivered = self.shared.undelivered.lock().expect("undelivered");
        for (worker, a) in assignments {
            tracing::info!(
                worker,
                job = a.job_id,
                rank = a.rank,
                attempt = a.attempt,
                "assigned"
            );
            let a = a.to_wire();
            match watchers.get(&worker) {
                Some(tx) if tx.try_send(Ok(a.clone())).is_ok() => {}
                _ => undelivered.entry(worker).or_default().push(a),
            }
        }
    }

    /// Drops the workers registered as `name`, whose process exited (`why`: how); the
    /// attempt one of them ran fails at once instead of after the heartbeat timeout.
    pub fn worker_exited(&self, name: &str, why: &str) -> bool {
        self.change(|c| Ok(c.worker_exited(name, why)))
            .unwrap_or(false)
    }

    /// Fails a job for good (its workers are told at their next heartbeat).
    pub fn fail_job(&self, id: &str, why: &str) {
        let _ = self.change(|c| {
            c.fail_job(id, why);
            Ok(())
        });
    }

    /// Whether the job has ended (succeeded, failed or cancelled) or is unknown.
    pub fn job_ended(&self, id: &str) -> bool {
        let cluster = self.shared.cluster.lock().expect("cluster lock");
        cluster.jobs.get(id).is_none_or(|j| j.state.is_final())
    }

    /// Checks that the worker whose session this is runs rank 0 (or, with `any_rank`, a rank)
    /// of `job`'s current `attempt`.
    fn check_caller(
        &self,
        session: &str,
        job: &str,
        attempt: u32,
        any_rank: bool,
    ) -> Result<(), Status> {
        let cluster = self.shared.cluster.lock().expect("cluster");
        let worker = cluster
            .session_owner(session)
            .ok_or_else(|| Status::permission_denied("no worker secret (taming-worker-secret)"))?;
        cluster
            .check_rank(worker, job, attempt, any_rank)
            .map_err(status)
    }

    /// Expires silent workers (called every second by [`serve`]).
    pub fn monitor_tick(&self) {
        let timeout = self.shared.opts.heartbeat_timeout;
        let _ = self.change(|c| {
            for w in c.expire(Instant::now(), timeout) {
                tracing::warn!(worker = w, "dropped: no heartbeat");
            }
            Ok(())
        });
    }
}

/// Serves on a bound listener (over TLS with `tls`) until `shutdown`, with the expiry
/// monitor.
pub async fn serve(
    service: CoordinatorService,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let monitor = service.clone();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            monitor.monitor_tick();
        }
    });
    // The standard gRPC health service (Kubernetes probes), outside the token check.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let result = builder
        .add_service(health)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    ticker.abort();
    result
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_worker(
        &self,
        r: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let span = tracing::info_span!("RegisterWorker", name = %r.get_ref().name);
        taming_telemetry::adopt(&span, r.metadata());
        let _in_rpc = span.enter();
        let r = job::Registration::decode(r.into_inner())?;
        let ring = r.ring_addr.clone();
        let id = self.change(|c| Ok(c.register(r, Instant::now())))?;
        tracing::info!(worker = id, ring, "registered");
        let session = self.shared.cluster.lock().expect("cluster").workers[&id]
            .session
            .clone();
        Ok(Response::new(RegisterReply {
            worker_id: id,
            heartbeat_ms: self.shared.opts.heartbeat_interval.as_millis() as u32,
            session,
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let session = session_of(&r);
        let r = r.into_inner();
        let busy = (!r.busy_job.is_empty()).then(|| (r.busy_job.clone(), r.busy_attempt));
        let mut cluster = self.shared.cluster.lock().expect("cluster");
        cluster.authorize(&r.worker_id, &session).map_err(status)?;
        let now = Instant::now();
        let stop = cluster.heartbeat(&r.worker_id, busy, now).map_err(status)?;
        cluster.note_work(&r.worker_id, r.work, now);
        Ok(Response::new(HeartbeatReply { stop_jobs: stop }))
    }

    type WatchAssignmentsStream = ReceiverStream<Result<Assignment, Status>>;

    async fn watch_assignments(
        &self,
        r: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let session = session_of(&r);
        let id = r.into_inner().worker_id;
        self.shared
            .cluster
            .lock()
            .expect("cluster")
            .authorize(&id, &session)
            .map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        let waiting = self
            .shared
            .undelivered
            .lock()
            .expect("undelivered")
            .remove(&id)
            .unwrap_or_default();
        for a in waiting {
            let _ = tx.try_send(Ok(a));
        }
        self.shared
            .watchers
            .lock()
            .expect("watchers")
            .insert(id, tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit(&self, r: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        let span = tracing::info_span!("Submit");
        taming_telemetry::adopt(&span, r.metadata());
        let _in_rpc = span.enter();
        let spec = job::decode_submit(r.into_inner())?;
        let id = self.change(|c| Ok(c.submit(spec)))?;
        tracing::info!(job = id, "submitted");
        Ok(Response::new(SubmitReply { job_id: id }))
    }

    async fn job_status(&self, r: Request<JobStatusRequest>) -> Result<Response<Job>, Status> {
        let id = r.into_inner().job_id;
        let job = self
            .shared
            .cluster
            .lock()
            .expect("cluster")
            .job(&id)
            .map_err(status)?;
        Ok(Response::new(job.to_wire()))
    }

    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsReply>, Status> {
        let c = self.shared.cluster.lock().expect("cluster");
        let jobs = c
            .jobs
            .keys()
            .filter_map(|id| c.job(id).ok())
            .map(|j| j.to_wire())
            .collect();
        Ok(Response::new(ListJobsReply { jobs }))
    }

    async fn report_progress(
        &self,
        r: Request<ProgressReport>,
    ) -> Result<Response<ProgressReply>, Status> {
        let span = tracing::info_span!(
            "ReportProgress",
            job = %r.get_ref().job_id,
            rank = r.get_ref().rank,
            step = r.get_ref().step
        );
        taming_telemetry::adopt(&span, r.metadata());
        let session = session_of(&r);
        let r = job::ProgressReport::decode(r.into_inner())?;
        let running = r.state == job::RankState::Running;
        let stop = span.in_scope(|| {
            self.change_with(running, |c| {
                c.authorize(&r.worker_id, &session)?;
                c.progress(&r)
            })
        })?;
        Ok(Response::new(ProgressReply { stop }))
    }

    async fn cancel(&self, r: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        let id = r.into_inner().job_id;
        let state = self.change(|c| c.cancel(&id))?;
        Ok(Response::new(CancelReply {
            state: state.to_wire(),
        }))
    }

    async fn publish_collective_id(
        &self,
        r: Request<CollectiveId>,
    ) -> Result<Response<PublishReply>, Status> {
        let session = session_of(&r);
        let r = r.into_inner();
        self.check_caller(&session, &r.job_id, r.attempt, false)?;
        if r.id.len() != 128 {
            return Err(Status::invalid_argument(format!(
                "id: {} bytes, NCCL ids have 128",
                r.id.len()
            )));
        }
        self.shared
            .ids
            .lock()
            .expect("ids")
            .insert((r.job_id, r.attempt), r.id);
        Ok(Response::new(PublishReply {}))
    }

    async fn fetch_collective_id(
        &self,
        r: Request<FetchCollectiveIdRequest>,
    ) -> Result<Response<CollectiveId>, Status> {
        let session = session_of(&r);
        let r = r.into_inner();
        self.check_caller(&session, &r.job_id, r.attempt, true)?;
        let ids = self.shared.ids.lock().expect("ids");
        let id = ids
            .get(&(r.job_id.clone(), r.attempt))
            .ok_or_else(|| Status::unavailable("rank 0 has not published the id yet"))?;
        Ok(Response::new(CollectiveId {
            job_id: r.job_id,
            attempt: r.attempt,
            id: id.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_reports_are_written_by_the_next_tick_and_every_other_change_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let service = CoordinatorService::new(ServeOptions {
            state_dir: dir.path().to_path_buf(),
            heartbeat_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            token: None,
            progress_timeout: Duration::ZERO,
            report_save_interval: Duration::from_secs(3600),
        })
        .unwrap();
        let on_disk = || std::fs::read_to_string(dir.path().join("jobs.json")).unwrap();
        let spec = job::decode_submit(SubmitRequest {
            spec: Some(JobSpec {
                stage: job::Stage::Vqgan.to_wire(),
                collective: job::Collective::Ring.to_wire(),
                out: "runs/x".into(),
                steps: 10,
                nodes: 1,
                stage_job: Some(job_spec::StageJob::VqganJob(VqganJob {})),
                ..Default::default()
            }),
        })
        .unwrap();
        let id = service.change(|c| Ok(c.submit(spec))).unwrap();
        assert!(on_disk().contains(&id), "a submit is written at once");
        service
            .change_with(true, |c| {
                c.jobs.get_mut(&id).unwrap().step = 5;
                Ok(())
            })
            .unwrap();
        assert!(on_disk().contains("\"step\": 0"), "a step report waits");
        service.monitor_tick();
        assert!(on_disk().contains("\"step\": 5"), "the tick writes it");
    }
}
