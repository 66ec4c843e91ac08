//! `worker --coordinator ADDR`: registers with the coordinator, heartbeats, takes
//! assignments one at a time and runs them: the trainer joins its group (the TCP ring or
//! NCCL), streams data from the dataloader services named by the job, reports every step,
//! and stops when the coordinator says so.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use taming_collective::{AllReduce, RingConfig, TcpRing, nccl};
use taming_model::device::DeviceSpec;
use taming_proto::coordinator::{
    Assignment as WireAssignment, CollectiveId, Device, FetchCollectiveIdRequest, HeartbeatRequest,
    RegisterReply, RegisterRequest, WatchRequest,
};
use taming_proto::job::{
    Assignment, Collective, Conditioning, JobSpec, ProgressReport, RankState, Stage, StageJob,
};
use taming_proto::tls::Transport;

use crate::checkpoint::LATEST;
use crate::devices;
use crate::engine::{Columns, Row, RunError};
use crate::metrics::{StepTiming, WorkerMetrics, serve_metrics};
use crate::mirror::RunMirror;
use crate::plan::{JobInputs, JobPlan};
use crate::settings::RunSettings;
use taming_dataloader::DataError;

type Client = taming_proto::CoordinatorClient;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Coordinator address.
    pub coordinator: String,
    /// Name shown in the registry.
    pub name: String,
    /// Cluster token.
    pub token: Option<String>,
    /// Where the ring listener binds.
    pub ring_bind: SocketAddr,
    /// Address peers use to reach the ring listener (default: the bound address).
    pub advertise: Option<String>,
    /// Longest wait on a peer inside a collective.
    pub collective_timeout: Duration,
    /// This worker's device (default: what the job asks for: cpu, or cuda/vulkan by rank).
    pub device: Option<DeviceSpec>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    pub metrics_bind: Option<SocketAddr>,
    /// Training batches decoded ahead (see [`RunSettings::prefetch`]).
    pub prefetch: usize,
    /// TLS (or plaintext, where allowed) to the coordinator and the dataloader services.
    pub transport: Transport,
}

/// The ring listener's own address, advertised when `--advertise` is absent; a warning when
/// it is every interface (`0.0.0.0`), which peers on other machines cannot dial.
fn bound_ring_addr(listener: &TcpListener) -> Result<String> {
    let bound = listener.local_addr()?;
    if bound.ip().is_unspecified() {
        tracing::warn!(
            "the ring listens on {bound} without --advertise: peers on other machines cannot \
             dial that address; give --advertise HOST:PORT"
        );
    }
    Ok(bound.to_string())
}

/// Runs the agent until the coordinator closes its assignment stream. A coordinator that
/// forgets this worker (it restarted, or dropped the worker as hung) ends the session: the
/// assignment in hand stops at its next step, and the worker registers again (waiting for the
/// coordinator as at start). A panic while running an assignment is reported to the
/// coordinator as the attempt's failure, then ends the process (exit status 101, as an
/// uncaught panic), since its state can no longer be trusted.
pub fn run_agent(opts: AgentOptions) -> Result<()> {
    crate::failpoint::configured().map_err(anyhow::Error::msg)?;
    record_panics();
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let listener =
        TcpListener::bind(opts.ring_bind).with_context(|| format!("binding {}", opts.ring_bind))?;
    let ring_addr = match &opts.advertise {
        Some(a) => a.clone(),
        None => bound_ring_addr(&listener)?,
    };
    let metrics = Arc::new(WorkerMetrics::default());
    if let Some(addr) = opts.metrics_bind {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("binding --metrics {addr}"))?;
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        rt.spawn(serve_metrics(metrics.clone(), listener));
    }
    let offered = devices::detect(opts.device.as_ref());
    tracing::info!(?offered, "devices");
    let request = RegisterRequest {
        name: opts.name.clone(),
        devices: offered
            .iter()
            .map(|(spec, memory_bytes)| Device {
                spec: spec.clone(),
                memory_bytes: *memory_bytes,
            })
            .collect(),
        ring_addr,
    };
    let host = Host {
        rt: &rt,
        listener: &listener,
        opts: &opts,
        offered: &offered,
        metrics,
    };
    loop {
        match serve_session(&host, request.clone())? {
            SessionEnd::Closed => return Ok(()),
            SessionEnd::Lost(why) => tracing::warn!("{why}; registering again"),
        }
    }
}

/// What a worker keeps across its sessions with the coordinator.
struct Host<'a> {
    rt: &'a tokio::runtime::Runtime,
    listener: &'a TcpListener,
    opts: &'a AgentOptions,
    offered: &'a [devices::Offered],
    metrics: Arc<WorkerMetrics>,
}

/// How a session with the coordinator ended.
enum SessionEnd {
    /// The coordinator closed the assignment stream: the worker is done.
    Closed,
    /// The coordinator went away or no longer knows this worker.
    Lost(String),
}

/// One registration: heartbeats, and the assignments it is given, run one at a time, until
/// the coordinator closes the stream or loses this worker.
fn serve_session(host: &Host, request: RegisterRequest) -> Result<SessionEnd> {
    let (rt, opts) = (host.rt, host.opts);
    let (_, reply) = register(rt, opts, request)?;
    let id = reply.worker_id;
    tracing::info!(worker = id, "registered");
    // From here on every call carries this worker's session.
    let caller = taming_proto::Caller {
        token: opts.token.as_deref(),
        session: Some(&reply.session),
    };
    let client = rt
        .block_on(taming_proto::connect_coordinator(
            &opts.coordinator,
            caller,
            &opts.transport,
        ))
        .context("connecting to the coordinator")?;
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Busy::default();
    let (lost_tx, mut lost) = tokio::sync::watch::channel(None);
    let beat = rt.spawn(heartbeat(
        Heartbeat {
            client: client.clone(),
            id: id.clone(),
            every: Duration::from_millis(reply.heartbeat_ms.max(100) as u64),
            stop: stop.clone(),
            busy: busy.clone(),
        },
        lost_tx,
    ));
    // The heartbeat of this session ends with it.
    let _beat = AbortOnDrop(beat);
    let mut stream = watch_assignments(rt, opts, caller, &id)?;
    let session = Session {
        rt,
        client: &client,
        worker_id: &id,
        listener: host.listener,
        opts,
        offered: host.offered,
        stop: stop.clone(),
        metrics: host.metrics.clone(),
    };
    loop {
        let a = match next_assignment(rt, &mut stream, &mut lost) {
            Ok(a) => a,
            Err(end) => return Ok(end),
        };
        stop.store(false, Ordering::SeqCst);
        if let Ok(mut b) = busy.lock() {
            *b = Some((a.job_id.clone(), a.attempt));
        }
        run_and_report(&session, &a);
        if let Ok(mut b) = busy.lock() {
            *b = None;
        }
        if lost.borrow().is_some() {
            return Ok(SessionEnd::Lost(lost_reason(&lost)));
        }
    }
}

/// The stream of this worker's assignments.
fn watch_assignments(
    rt: &tokio::runtime::Runtime,
    opts: &AgentOptions,
    caller: taming_proto::Caller<'_>,
    id: &str,
) -> Result<tonic::Streaming<WireAssignment>> {
    let stream = rt
        .block_on(async {
            let mut c = taming_proto::connect_coordinator_stream(
                &opts.coordinator,
                caller,
                &opts.transport,
            )
            .await?;
            let watch = WatchRequest {
                worker_id: id.to_string(),
            };
            Ok::<_, anyhow::Error>(c.watch_assignments(watch).await?)
        })
        .context("watching assignments")?;
    Ok(stream.into_inner())
}

/// The next assignment, or how the session ended: the stream closed or broke, or the
/// heartbeat heard that the coordinator lost this worker.
fn next_assignment(
    rt: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<WireAssignment>,
    lost: &mut tokio::sync::watch::Receiver<Option<String>>,
) -> Result<WireAssignment, SessionEnd> {
    let next = rt.block_on(async {
        tokio::select! {
            m = stream.message() => Ok(m),
            _ = lost.wait_for(Option::is_some) => Err(()),
        }
    });
    match next {
        Ok(Ok(Some(a))) => Ok(a),
        Ok(Ok(None)) => Err(SessionEnd::Closed),
        Ok(Err(e)) => Err(SessionEnd::Lost(format!(
            "the assignment stream broke: {e}"
        ))),
        Err(()) => Err(SessionEnd::Lost(lost_reason(lost))),
    }
}

/// Why the heartbeat says the session is lost.
fn lost_reason(lost: &tokio::sync::watch::Receiver<Option<String>>) -> String {
    lost.borrow().clone().unwrap_or_default()
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one assignment and reports how it ended; a panic ends the process once reported.
fn run_and_report(session: &Session, a: &WireAssignment) {
    tracing::info!(
        job = a.job_id,
        rank = a.rank,
        attempt = a.attempt,
        "assignment"
    );
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_assignment(session, a)));
    let panicked = outcome.is_err();
    let result = outcome.unwrap_or_else(|_| Err(anyhow::anyhow!("{}", last_panic())));
    let (state, message) = match &result {
        Ok(()) => (
            RankState::Succeeded,
            format!("done in {:.0} s", started.elapsed().as_secs_f64()),
        ),
        Err(e) => (RankState::Failed, format!("{e:#}")),
    };
    let retryable = panicked || result.as_ref().err().is_some_and(retryable);
    if let Err(e) = &result {
        tracing::error!(job = a.job_id, "{e:#}");
    }
    let report = ProgressReport {
        worker_id: session.worker_id.to_string(),
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        step: 0,
        losses: Default::default(),
        images_per_s: 0.0,
        state,
        message,
        retryable,
    };
    let mut client = session.client.clone();
    let _ = session
        .rt
        .block_on(client.report_progress(report.to_wire()));
    if panicked {
        std::process::exit(101);
    }
}

/// The latest panic of this process, as `panicked at FILE:LINE:COL: MESSAGE`.
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Keeps each panic's message and place for [`last_panic`], then prints it as Rust does.
fn record_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = format!("panicked{place}: {message}");
        }
        default(info);
    }));
}

fn last_panic() -> String {
    LAST_PANIC
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|_| "panicked".into())
}

/// How long a worker waits for a coordinator that is not up yet (started at the same time,
/// or restarting).
const COORDINATOR_WAIT: Duration = Duration::from_secs(120);

/// Connects and registers, retrying while the coordinator cannot be reached; a refusal (a
/// wrong token, a bad request) fails at once.
fn register(
    rt: &tokio::runtime::Runtime,
    opts: &AgentOptions,
    request: RegisterRequest,
) -> Result<(Client, RegisterReply)> {
    let deadline = Instant::now() + COORDINATOR_WAIT;
    loop {
        let attempt = rt.block_on(async {
            let mut client =
                connect(&opts.coordinator, opts.token.as_deref(), &opts.transport).await?;
            let reply = client
                .register_worker(request.clone())
                .await
                .context("registering with the coordinator")?;
            Ok::<_, anyhow::Error>((client, reply.into_inner()))
        });
        match attempt {
            Err(e) if unreachable(&e) && Instant::now() < deadline => {
                tracing::warn!("{e:#}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Whether an error says the coordinator could not be reached (as opposed to a refusal).
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::transport::Error>().is_some()
            || matches!(
                c.downcast_ref::<taming_proto::ConnectError>(),
                Some(taming_proto::ConnectError::Transport(_))
            )
            || c.downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::Unavailable)
    })
}

/// Failures a restart from the last checkpoint can cure: a peer or a data service went away.
fn retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<taming_collective::CollectiveError>()
            .is_some()
            || matches!(
                c.downcast_ref::<RunError>(),
                Some(RunError::Collective(_) | RunError::Data(DataError::Service { .. }))
            )
    })
}

async fn connect(addr: &str, token: Option<&str>, transport: &Transport) -> Result<Client> {
    let caller = taming_proto::Caller {
        token,
        session: None,
    };
    taming_proto::connect_coordinator(addr, caller, transport)
        .await
        .with_context(|| format!("connecting to the coordinator at {addr}"))
}

/// The assignment (job, attempt) the worker is running, which its heartbeats announce.
type Busy = Arc<Mutex<Option<(String, u32)>>>;

/// Heartbeats the coordinator has not answered before the worker takes it for gone.
const HEARTBEAT_FAILURES: u32 = 30;

/// What a session's heartbeat sends with and where it says what it heard.
struct Heartbeat {
    client: Client,
    id: String,
    every: Duration,
    /// Set when the coordinator says the running assignment must stop.
    stop: Arc<AtomicBool>,
    busy: Busy,
}

/// Heartbeats every `h.every`, with the assignment in hand and the work counter. When the
/// coordinator no longer knows this worker (it restarted, or dropped the worker as hung),
/// the assignment is told to stop and `lost` says why; a worker whose session is not over
/// [`HEARTBEAT_FAILURES`] beats later (its training thread is stuck), or whose coordinator
/// does not answer that many, exits (status 3) for its supervisor to start it afresh.
async fn heartbeat(h: Heartbeat, lost: tokio::sync::watch::Sender<Option<String>>) {
    let mut failures = 0;
    loop {
        tokio::time::sleep(h.every).await;
        if lost.borrow().is_some() {
            failures += 1;
            if failures >= HEARTBEAT_FAILURES {
                tracing::error!(
                    "the coordinator lost this worker, and its assignment does not stop; exiting"
                );
                std::process::exit(3);
            }
            continue;
        }
        let (busy_job, busy_attempt) = h
            .busy
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
            .unwrap_or_default();
        let beat = HeartbeatRequest {
            worker_id: h.id.clone(),
            busy_job,
            busy_attempt,
            work: crate::liveness::work(),
        };
        match h.client.clone().heartbeat(beat).await {
            Ok(r) => {
                failures = 0;
                if !r.into_inner().stop_jobs.is_empty() {
                    h.stop.store(true, Ordering::SeqCst);
                }
            }
            Err(e) if forgotten(&e) => {
                tracing::warn!("heartbeat refused: {}", e.message());
                h.stop.store(true, Ordering::SeqCst);
                failures = 0;
                let _ = lost.send(Some(format!(
                    "the coordinator no longer knows worker {} ({})",
                    h.id,
                    e.message()
                )));
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("heartbeat failed: {e}");
                if failures >= HEARTBEAT_FAILURES {
                    tracing::error!("the coordinator is gone; exiting");
                    std::process::exit(3);
                }
            }
        }
    }
}

/// Whether a refused heartbeat says the coordinator does not know this worker's session.
fn forgotten(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::NotFound | tonic::Code::PermissionDenied
    )
}

/// The worker's registered session with the coordinator: what every assignment runs with.
struct Session<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a Client,
    worker_id: &'a str,
    listener: &'a TcpListener,
    opts: &'a AgentOptions,
    offered: &'a [devices::Offered],
    stop: Arc<AtomicBool>,
    metrics: Arc<WorkerMetrics>,
}

/// Runs one assignment, decoded (checked) here: one that does not decode fails the attempt
/// (reported as any other failure).
fn run_assignment(session: &Session, a: &WireAssignment) -> Result<()> {
    let Session {
        rt,
        client,
        worker_id,
        opts,
        offered,
        ..
    } = *session;
    let job_span = tracing::info_span!("job", job = %a.job_id, rank = a.rank, attempt = a.attempt);
    let _in_job = job_span.enter();
    let a = &Assignment::decode(a.clone()).context("the coordinator's assignment")?;
    let spec = a.spec.clone();
    let plan = JobPlan::new(job_inputs(&spec))?;
    let out = std::path::PathBuf::from(&spec.out);
    let checkpoint_url = spec.checkpoint_url.clone();
    let resume = a.resume && has_checkpoint(&out, checkpoint_url.as_deref())?;
    let chosen = devices::choose(spec.device.as_str(), a.rank, opts.device.as_ref(), offered)?;
    let device = chosen.device().map_err(anyhow::Error::msg)?.autodiff();
    tracing::info!(rank = a.rank, device = %chosen, "training device");
    let group = make_group(session, a, &chosen)?;
    let reporter = Reporter {
        rt: rt.handle().clone(),
        client: client.clone(),
        worker_id: worker_id.into(),
        a: a.clone(),
        stop: session.stop.clone(),
        metrics: session.metrics.clone(),
        stage: spec.stage(),
    };
    let mut settings = RunSettings::single(out, spec.steps, device);
    settings.resume = resume;
    settings.checkpoint_url = checkpoint_url;
    settings.eval_every = spec.eval_every.max(1);
    settings.checkpoint_every = spec.checkpoint_every.max(1);
    settings.prefetch = opts.prefetch;
    settings.attempt = a.attempt;
    settings.join(a.rank as usize, a.world_size as usize, group);
    let hook = Box::new(move |columns: &Columns, row: &Row| reporter.report(columns, row));
    plan.run(settings, Some(hook), false)?;
    Ok(())
}

/// What an assignment's spec names, as the run plan takes it.
fn job_inputs(spec: &JobSpec) -> JobInputs {
    let transformer = match &spec.stage_job {
        StageJob::Transformer(t) => Some(t),
        StageJob::Vqgan(_) => None,
    };
    let cond = transformer.map_or(Conditioning::None, |t| t.cond);
    JobInputs {
        stage: spec.stage(),
        config_yaml: spec.config_yaml.clone(),
        config_name: "the job's config".into(),
        data: (!spec.data.is_empty()).then(|| spec.data.clone()),
        dataloaders: spec.dataloaders.clone(),
        vqgan: transformer.map(|t| t.vqgan.clone().into()),
        cond,
        cond_vqgan: transformer.and_then(|t| t.cond_vqgan.clone().map(Into::into)),
        codes: transformer.and_then(|t| t.codes.clone()),
        val_codes: transformer.and_then(|t| t.val_codes.clone()),
    }
}

/// Whether the run has a checkpoint to resume from, in `out` or in its object-store copy.
fn has_checkpoint(out: &std::path::Path, url: Option<&str>) -> Result<bool> {
    if out.join("checkpoints").join(LATEST).exists() {
        return Ok(true);
    }
    Ok(match url {
        Some(url) => RunMirror::open(url)?.latest()?.is_some(),
        None => false,
    })
}

fn make_group(
    session: &Session,
    a: &Assignment,
    device: &DeviceSpec,
) -> Result<Option<Box<dyn AllReduce>>> {
    let Session {
        rt,
        client,
        listener,
        opts,
        ..
    } = *session;
    let spec = &a.spec;
    if a.world_size <= 1 {
        return Ok(None);
    }
    if spec.collective == Collective::Nccl {
        let ordinal = devices::nccl_ordinal(device, a.rank)?;
        return Ok(Some(Box::new(nccl_group(rt, client, a, ordinal)?)));
    }
    let peers = a.peers.clone();
    let mut h = DefaultHasher::new();
    (&a.job_id, a.attempt).hash(&mut h);
    let cfg = RingConfig {
        rank: a.rank as usize,
        peers,
        job: h.finish(),
        secret: a.ring_secret,
        timeout: opts.collective_timeout,
    };
    Ok(Some(Box::new(TcpRing::connect(
        listener.try_clone()?,
        &cfg,
    )?)))
}

/// The NCCL communicator of rank `a.rank` on CUDA device `ordinal` (the device this rank
/// was given, not its rank: a pod with one GPU runs every rank on `cuda:0`).
fn nccl_group(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    a: &Assignment,
    ordinal: usize,
) -> Result<nccl::Nccl> {
    let mut c = client.clone();
    let id = if a.rank == 0 {
        let id = nccl::new_id()?;
        rt.block_on(c.publish_collective_id(CollectiveId {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            id: id.to_vec(),
        }))?;
        id
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let req = FetchCollectiveIdRequest {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
            };
            match rt.block_on(c.fetch_collective_id(req)) {
                Ok(r) => {
                    break r
                        .into_inner()
                        .id
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("malformed NCCL id"))?;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => bail!("rank 0 never published the NCCL id: {e}"),
            }
        }
    };
    Ok(nccl::Nccl::new(
        ordinal,
        a.rank as usize,
        a.world_size as usize,
        id,
    )?)
}

/// Sends each step's metrics to the coordinator; says whether to go on.
struct Reporter {
    rt: tokio::runtime::Handle,
    client: Client,
    worker_id: String,
    a: Assignment,
    stop: Arc<AtomicBool>,
    metrics: Arc<WorkerMetrics>,
    stage: Stage,
}

impl Reporter {
    /// Reports a step's values and throughput (to the coordinator and the metrics); says
    /// whether to go on.
    fn report(&self, columns: &Columns, row: &Row) -> bool {
        self.send(row.step, &row.named(columns), row.rate, row.timing)
    }

    fn send(&self, step: u64, losses: &[(&str, f64)], rate: f64, timing: StepTiming) -> bool {
        crate::failpoint::at_step(step);
        self.metrics
            .record(&self.a.job_id, self.stage.as_str(), step, rate, timing);
        let losses = losses.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let report = ProgressReport {
            worker_id: self.worker_id.clone(),
            job_id: self.a.job_id.clone(),
            attempt: self.a.attempt,
            rank: self.a.rank,
            step,
            losses,
            images_per_s: rate,
            state: RankState::Running,
            message: String::new(),
            retryable: false,
        };
        let mut client = self.client.clone();
        let stop = match self
            .rt
            .block_on(client.report_progress(taming_telemetry::traced(report.to_wire())))
        {
            Ok(r) => r.into_inner().stop,
            Err(e) => {
                tracing::warn!("progress report failed: {e}");
                false
            }
        };
        !(stop || self.stop.load(Ordering::SeqCst))
    }
}
