//! The dataloader service: `StreamBatches` streams ready batches for one rank of a job from a
//! resume state; every request is checked before any work. Batches are produced on a
//! blocking thread per stream with a bounded queue, so a slow client holds at most
//! [`QUEUED_BATCHES`] batches in memory.
//!
//! What a request may ask for is bounded before anything is allocated: calls must carry the
//! cluster token when the service has one ([`ServiceOptions::token`]); at most
//! [`ServiceOptions::max_streams`] streams run at once; a batch holds at most
//! [`MAX_BATCH_BYTES`]; shard lists expand to at most [`MAX_SHARDS`] names; local shards are
//! read only below [`ServiceOptions::data_roots`]. Refusals name the request field.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use taming_proto::auth::RequireToken;
use taming_proto::dataloader::dataloader_server::{Dataloader, DataloaderServer};
use taming_proto::dataloader::{Batch, DType, HealthReply, HealthRequest, StreamRequest, Tensor};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::loader::{LoaderConfig, PixelBatch, ShardLoader};
use crate::reader::{LoaderState, ReaderConfig};
use crate::shards::{DataRoots, resolve};
use crate::source::brace_expansion;
use crate::transform::{Channel, Preprocess};

/// The environment variable holding the cluster token (re-exported for the binary).
pub use taming_proto::auth::TOKEN_ENV;

/// Batches queued per stream ahead of the client.
pub const QUEUED_BATCHES: usize = 2;
/// Largest message either side accepts (a 64 x 3 x 512 x 512 f32 batch is 201 MB).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Streams one instance serves at once unless told otherwise (`dataloader serve
/// --max-streams`); each has a thread and up to [`QUEUED_BATCHES`] + 2 batches in memory.
pub const DEFAULT_MAX_STREAMS: usize = 32;
/// Most bytes one batch may hold: `batch_size x size x size x (3 x dtype bytes + 1)`, images
/// at the requested dtype plus label maps, so that a batch with its keys and state fits in a
/// [`MAX_MESSAGE_BYTES`] message (64 x 3 x 512 x 512 as f32 with maps is 218 MB).
pub const MAX_BATCH_BYTES: u64 = 448 << 20;
/// Most shards a request's list may name, after brace patterns and directories expand.
pub const MAX_SHARDS: usize = 1 << 20;
/// Most bytes the expanded shard names of a request may take together.
pub const MAX_SHARD_LIST_BYTES: u64 = 64 << 20;

/// Limits on request fields.
const MAX_BATCH: u32 = 4096;
const MAX_SIZE: u32 = 4096;
const MAX_URL: usize = 4096;
const MAX_STATE: usize = 64 << 20;

/// Counters of one service instance.
#[derive(Debug)]
pub struct ServiceStats {
    /// Streams open now.
    pub active: AtomicU32,
    /// Batches sent since start.
    pub served: AtomicU64,
    /// Samples sent since start.
    pub samples: AtomicU64,
    /// Samples skipped as unusable (undecodable, no image, bad map) since start.
    pub skipped: AtomicU64,
    /// Batches decoded and waiting to be sent, over all open streams.
    pub queued: AtomicU64,
    /// When the instance started.
    pub started: std::time::Instant,
}

impl Default for ServiceStats {
    fn default() -> Self {
        Self {
            active: AtomicU32::new(0),
            served: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl ServiceStats {
    /// The counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let samples = load(&self.samples);
        let uptime = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut e = taming_proto::metrics::Exposition::default();
        e.family(
            "taming_dataloader_clients",
            "gauge",
            "Batch streams open now.",
        )
        .sample(
            "taming_dataloader_clients",
            &[],
            self.active.load(Ordering::Relaxed) as f64,
        )
        .family(
            "taming_dataloader_batches_total",
            "counter",
            "Batches sent.",
        )
        .sample("taming_dataloader_batches_total", &[], load(&self.served))
        .family(
            "taming_dataloader_samples_total",
            "counter",
            "Samples sent.",
        )
        .sample("taming_dataloader_samples_total", &[], samples)
        .family(
            "taming_dataloader_samples_per_second",
            "gauge",
            "Samples sent per second since start (rate() of the total for recent rates).",
        )
        .sample(
            "taming_dataloader_samples_per_second",
            &[],
            samples / uptime,
        )
        .family(
            "taming_dataloader_decode_errors_total",
            "counter",
            "Samples skipped as unusable.",
        )
        .sample(
            "taming_dataloader_decode_errors_total",
            &[],
            load(&self.skipped),
        )
        .family(
            "taming_dataloader_queue_depth",
            "gauge",
            "Decoded batches waiting to be sent.",
        )
        .sample("taming_dataloader_queue_depth", &[], load(&self.queued))
        .spans_dropped(taming_telemetry::dropped_spans());
        e.finish()
    }
}

/// How an instance serves.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The cluster token every call must carry (`authorization: Bearer <token>`); `None`
    /// checks nothing. The standard gRPC health service answers without it.
    pub token: Option<String>,
    /// Streams served at once; one more is refused with RESOURCE_EXHAUSTED until one ends
    /// or its client goes away.
    pub max_streams: usize,
    /// Where local shards may be read from (none: object-store URLs only).
    pub data_roots: DataRoots,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            token: None,
            max_streams: DEFAULT_MAX_STREAMS,
            data_roots: DataRoots::default(),
        }
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct DataloaderService {
    stats: Arc<ServiceStats>,
    token: Option<String>,
    max_streams: usize,
    streams: Arc<Semaphore>,
    data_roots: Arc<DataRoots>,
}

impl Default for DataloaderService {
    /// No token, [`DEFAULT_MAX_STREAMS`], object-store URLs only.
    fn default() -> Self {
        Self::new(ServiceOptions::default())
    }
}

impl DataloaderService {
    /// An instance with `opts`.
    pub fn new(opts: ServiceOptions) -> Self {
        Self {
            stats: Arc::default(),
            token: opts.token,
            max_streams: opts.max_streams,
            streams: Arc::new(Semaphore::new(opts.max_streams)),
            data_roots: Arc::new(opts.data_roots),
        }
    }

    /// This instance's counters.
    pub fn stats(&self) -> Arc<ServiceStats> {
        self.stats.clone()
    }

    /// The tonic server around this service, with message limits raised for batches and
    /// calls checked for the token.
    pub fn into_server(self) -> InterceptedService<DataloaderServer<Self>, RequireToken> {
        let token = RequireToken::new(self.token.clone());
        let server = DataloaderServer::new(self)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_STATE + (MAX_SHARDS * 64));
        InterceptedService::new(server, token)
    }
}

/// Serves on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(DataloaderService::default().into_server())
        .serve_with_shutdown(addr, shutdown)
        .await
}

/// Serves on an already bound listener (tests bind port 0 first).
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_service(DataloaderService::default(), listener, None, shutdown).await
}

/// Serves `GET /metrics` (the Prometheus text of `stats`) on a bound listener; other paths
/// get 404.
pub async fn serve_metrics(
    stats: Arc<ServiceStats>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = stats.render();
            async move {
                (
                    [(header::CONTENT_TYPE, taming_proto::metrics::CONTENT_TYPE)],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `service` on a bound listener.
pub async fn serve_service(
    service: DataloaderService,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // The standard gRPC health service (Kubernetes probes).
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<DataloaderServer<DataloaderService>>()
        .await;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

#[tonic::async_trait]
impl Dataloader for DataloaderService {
    type StreamBatchesStream = ReceiverStream<Result<Batch, Status>>;

    async fn stream_batches(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let span = tracing::info_span!(
            "StreamBatches",
            shards = request.get_ref().shards.len(),
            rank = request.get_ref().rank
        );
        taming_telemetry::adopt(&span, request.metadata());
        // Held by the stream's thread: released when the stream ends, fails, or its client
        // goes away (the next send fails and the thread returns).
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "streams: {0} open, at most {0} at once on this instance (max_streams)",
                self.max_streams
            ))
        })?;
        let roots = self.data_roots.clone();
        let request = request.into_inner();
        // Checking may expand patterns and look at the file system: off the async workers.
        let job = tokio::task::spawn_blocking(move || Job::check(request, &roots))
            .await
            .map_err(|e| Status::internal(format!("checking the request: {e}")))??;
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        let stats = self.stats.clone();
        stats.active.fetch_add(1, Ordering::Relaxed);
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("taming-batches".into())
            .spawn(move || {
                let _in_stream = span.enter();
                job.produce(&tx, &thread_stats);
                thread_stats.active.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            })
            .map_err(|e| {
                stats.active.fetch_sub(1, Ordering::Relaxed);
                Status::resource_exhausted(format!("no thread for the stream: {e}"))
            })?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(HealthReply {
            active_streams: self.stats.active.load(Ordering::Relaxed),
            batches_served: self.stats.served.load(Ordering::Relaxed),
        }))
    }
}

/// A checked request.
struct Job {
    shards: Vec<String>,
    cfg: LoaderConfig,
    state: LoaderState,
    dtype: DType,
    max_batches: u64,
    single_epoch: bool,
}

/// Checks a request as the service does before any work (sizes, ranges, paths, the resume
/// state), without serving it: the error names the field. (The fuzz target's entry point.)
pub fn check_request(r: StreamRequest, roots: &DataRoots) -> Result<(), Status> {
    Job::check(r, roots).map(|_| ())
}

impl Job {
    fn check(r: StreamRequest, roots: &DataRoots) -> Result<Self, Status> {
        let bad = |field: &str, why: String| Err(invalid(field, why));
        if r.shards.is_empty() || r.shards.len() > MAX_SHARDS {
            return bad(
                "shards",
                format!("{} given; 1..={MAX_SHARDS} allowed", r.shards.len()),
            );
        }
        if let Some(s) = r.shards.iter().find(|s| s.is_empty() || s.len() > MAX_URL) {
            return bad(
                "shards",
                format!("entry of length {} (1..={MAX_URL})", s.len()),
            );
        }
        if r.batch_size == 0 || r.batch_size > MAX_BATCH {
            return bad(
                "batch_size",
                format!("{} not in 1..={MAX_BATCH}", r.batch_size),
            );
        }
        if r.size == 0 || r.size > MAX_SIZE {
            return bad("size", format!("{} not in 1..={MAX_SIZE}", r.size));
        }
        let dtype = match DType::try_from(r.dtype) {
            Ok(DType::F32) => DType::F32,
            Ok(_) => DType::Uint8,
            Err(_) => return bad("dtype", format!("unknown value {}", r.dtype)),
        };
        let value_bytes = if dtype == DType::F32 { 4 } else { 1 };
        let pixels = r.batch_size as u64 * r.size as u64 * r.size as u64;
        let batch_bytes = pixels * (3 * value_bytes + 1);
        if batch_bytes > MAX_BATCH_BYTES {
            return Err(Status::resource_exhausted(format!(
                "batch_size/size: {} x {1} x {1} images as {dtype:?} (with label maps) would be \
                 {batch_bytes} bytes a batch; at most {MAX_BATCH_BYTES}",
                r.batch_size, r.size
            )));
        }
        if r.world_size == 0 || r.rank >= r.world_size {
            return bad(
                "rank",
                format!("{} with world_size {}", r.rank, r.world_size),
            );
        }
        if r.read_slots > 64 || r.shuffle_buffer > 100_000 {
            return bad(
                "read_slots/shuffle_buffer",
                "read_slots <= 64, shuffle_buffer <= 100000".into(),
            );
        }
        if r.state.len() > MAX_STATE {
            return bad(
                "state",
                format!("{} bytes (at most {MAX_STATE})", r.state.len()),
            );
        }
        let state: LoaderState = if r.state.is_empty() {
            LoaderState::default()
        } else {
            serde_json::from_str(&r.state).map_err(|e| invalid("state", e.to_string()))?
        };
        // The reader's buffer never holds more: more would be read back into memory.
        if state.pending.len() > r.shuffle_buffer as usize {
            return bad(
                "state",
                format!(
                    "{} pending samples with a shuffle_buffer of {}",
                    state.pending.len(),
                    r.shuffle_buffer
                ),
            );
        }
        let shards = shard_list(&r.shards, roots)?;
        let cfg = LoaderConfig {
            batch_size: r.batch_size as usize,
            preprocess: Preprocess {
                size: r.size as usize,
                random_crop: r.random_crop,
                flip: r.flip,
            },
            reader: ReaderConfig {
                rank: r.rank as usize,
                world_size: r.world_size as usize,
                read_slots: r.read_slots.max(1) as usize,
                shuffle_buffer: r.shuffle_buffer as usize,
                shuffle_shards: r.shuffle,
                seed: r.seed,
            },
            require_masks: r.require_masks,
        };
        Ok(Self {
            shards,
            cfg,
            state,
            dtype,
            max_batches: r.max_batches,
            single_epoch: r.single_epoch,
        })
    }

    fn produce(self, tx: &mpsc::Sender<Result<Batch, Status>>, stats: &ServiceStats) {
        let mut loader = match ShardLoader::open(&self.shards, self.cfg, &self.state) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::failed_precondition(e.to_string())));
                return;
            }
        };
        let mut sent = 0u64;
        let mut skipped = 0u64;
        let mut depth = QueueDepth { stats, mine: 0 };
        while self.max_batches == 0 || sent < self.max_batches {
            let read = tracing::info_span!("shard_read", batch = sent).entered();
            let next = if self.single_epoch {
                loader.next_pixels_in_epoch()
            } else {
                loader.next_pixels().map(Some)
            };
            drop(read);
            let now_skipped = loader.skipped();
            stats
                .skipped
                .fetch_add(now_skipped - skipped, Ordering::Relaxed);
            skipped = now_skipped;
            let n = match &next {
                Ok(Some(b)) => b.shape[0] as u64,
                _ => 0,
            };
            let item = match next {
                Ok(Some(b)) => Ok(to_proto(b, self.dtype, now_skipped)),
                Ok(None) => return,
                Err(e) => Err(Status::failed_precondition(e.to_string())),
            };
            let failed = item.is_err();
            let sent_ok = tx.blocking_send(item).is_ok();
            depth.set((tx.max_capacity() - tx.capacity()) as u64);
            if !sent_ok || failed {
                return;
            }
            sent += 1;
            stats.served.fetch_add(1, Ordering::Relaxed);
            stats.samples.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// This stream's share of [`ServiceStats::queued`], withdrawn when the stream ends.
struct QueueDepth<'a> {
    stats: &'a ServiceStats,
    mine: u64,
}

impl QueueDepth<'_> {
    fn set(&mut self, depth: u64) {
        if depth >= self.mine {
            self.stats
                .queued
                .fetch_add(depth - self.mine, Ordering::Relaxed);
        } else {
            self.stats
                .queued
                .fetch_sub(self.mine - depth, Ordering::Relaxed);
        }
        self.mine = depth;
    }
}

impl Drop for QueueDepth<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// The shards `specs` name, each local one checked against `roots` before the file system
/// is touched, and the expanded list bounded before it is built.
fn shard_list(specs: &[String], roots: &DataRoots) -> Result<Vec<String>, Status> {
    let too_many = |names: u64, bytes: u64| {
        Status::resource_exhausted(format!(
            "shards: the list expands to {names} names ({bytes} bytes); at most {MAX_SHARDS} \
             names of {MAX_SHARD_LIST_BYTES} bytes in all"
        ))
    };
    let (mut names, mut bytes) = (0u64, 0u64);
    for spec in specs {
        let size = brace_expansion(spec).map_err(|e| invalid("shards", e.to_string()))?;
        names = names.saturating_add(size.names);
        bytes = bytes.saturating_add(size.bytes);
    }
    if names > MAX_SHARDS as u64 || bytes > MAX_SHARD_LIST_BYTES {
        return Err(too_many(names, bytes));
    }
    let mut shards = Vec::new();
    let mut bytes = 0;
    for spec in specs {
        if !spec.contains('{') {
            roots.check(spec).map_err(|e| invalid("shards", e))?;
        }
        for shard in resolve(spec).map_err(|e| invalid("shards", e.to_string()))? {
            roots.check(&shard).map_err(|e| invalid("shards", e))?;
            bytes += shard.len() as u64;
            shards.push(shard);
        }
        if shards.len() > MAX_SHARDS || bytes > MAX_SHARD_LIST_BYTES {
            return Err(too_many(shards.len() as u64, bytes));
        }
    }
    Ok(shards)
}

fn invalid(field: &str, why: String) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn to_proto(b: PixelBatch, dtype: DType, skipped: u64) -> Batch {
    let data = match dtype {
        DType::F32 => b
            .images
            .iter()
            .flat_map(|&p| f32::from_byte(p).to_le_bytes())
            .collect(),
        _ => b.images,
    };
    let [n, _, h, w] = b.shape;
    Batch {
        images: Some(Tensor {
            dtype: dtype as i32,
            shape: b.shape.iter().map(|&d| d as u64).collect(),
            data,
        }),
        masks: b.masks.map(|m| Tensor {
            dtype: DType::Uint8 as i32,
            shape: vec![n as u64, h as u64, w as u64],
            data: m,
        }),
        labels: b.labels.iter().map(|l| l.unwrap_or(-1)).collect(),
        keys: b.keys,
        sources: b.sources,
        state: serde_json::to_string(&b.state).expect("state serializes"),
        skipped,
    }
}
