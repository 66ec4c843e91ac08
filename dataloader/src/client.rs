//! The trainer's side of the dataloader service: a [`BatchSource`] that streams batches from
//! one of several service instances and, when its instance dies, reconnects to the next and
//! resumes from the state of the last batch it received, so nothing is duplicated or lost.
//! Every call carries the cluster token (from `TAMING_CLUSTER_TOKEN`, or [`RemoteLoader::token`])
//! over TLS as the `TAMING_TLS_*` variables set it (see `taming_proto::tls`; plaintext on
//! loopback, elsewhere only with `TAMING_INSECURE=1`).

use std::time::Duration;

use taming_proto::auth::{AttachToken, TOKEN_ENV};
use taming_proto::dataloader::dataloader_client::DataloaderClient;
use taming_proto::dataloader::{Batch, DType, StreamRequest};
use taming_proto::tls::{TlsArgs, Transport};
use tonic::{Code, Streaming};

use crate::error::DataError;
use crate::loader::{BatchSource, ImageBatch, LoaderConfig};
use crate::reader::LoaderState;
use crate::runtime;
use crate::service::MAX_MESSAGE_BYTES;
use crate::transform::normalize;

/// Connection attempts per instance before giving up.
const ROUNDS: usize = 3;

/// Batches from dataloader service instances.
pub struct RemoteLoader {
    addrs: Vec<String>,
    request: StreamRequest,
    token: Option<String>,
    transport: Result<Transport, String>,
    state: LoaderState,
    current: usize,
    stream: Option<Streaming<Batch>>,
    failovers: u64,
    /// Skips counted by earlier streams, and by the current one.
    skipped: (u64, u64),
}

impl RemoteLoader {
    /// A client for `shards` with `cfg`, trying `addrs` in order (`http://host:port` or
    /// `host:port`), starting at `state`, sending the cluster token of `TAMING_CLUSTER_TOKEN`
    /// when it is set.
    pub fn new(
        addrs: Vec<String>,
        shards: Vec<String>,
        cfg: LoaderConfig,
        state: LoaderState,
    ) -> Self {
        let p = cfg.preprocess;
        let r = cfg.reader;
        // The service resolves paths in its own working directory: send local ones whole.
        let shards = shards
            .into_iter()
            .map(|s| match s.contains("://") {
                true => s,
                false => std::path::absolute(&s).map_or(s, |p| p.to_string_lossy().into_owned()),
            })
            .collect();
        let request = StreamRequest {
            shards,
            rank: r.rank as u32,
            world_size: r.world_size as u32,
            batch_size: cfg.batch_size as u32,
            seed: r.seed,
            size: p.size as u32,
            random_crop: p.random_crop,
            flip: p.flip,
            shuffle: r.shuffle_shards,
            shuffle_buffer: r.shuffle_buffer as u32,
            read_slots: r.read_slots as u32,
            state: String::new(),
            dtype: DType::Uint8 as i32,
            max_batches: 0,
            single_epoch: false,
            require_masks: cfg.require_masks,
        };
        let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        let transport = TlsArgs::from_env().load().map_err(|e| e.to_string());
        Self {
            addrs,
            request,
            token,
            transport,
            state,
            current: 0,
            stream: None,
            failovers: 0,
            skipped: (0, 0),
        }
    }

    /// Stop at the end of the current epoch ([`Self::next_in_epoch`] returns `None`).
    pub fn single_epoch(mut self) -> Self {
        self.request.single_epoch = true;
        self
    }

    /// Ask for f32 tensors (x / 127.5 - 1, made by the service) instead of bytes: four times
    /// the traffic, no conversion on this side.
    pub fn floats(mut self) -> Self {
        self.request.dtype = DType::F32 as i32;
        self
    }

    /// Send `token` as the cluster token (`None`: none), instead of `TAMING_CLUSTER_TOKEN`'s.
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }

    /// Talk TLS (or plaintext) as `transport` says, instead of as the environment does.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Ok(transport);
        self
    }

    /// Times the client moved to another instance.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The next batch; `None` only at the end of an epoch in single-epoch mode.
    pub fn next_in_epoch(&mut self) -> Result<Option<ImageBatch>, DataError> {
        let mut failures = 0;
        loop {
            match self.try_next() {
                Ok(next) => return Ok(next),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => {
                    failures += 1;
                    tracing::warn!(addr = %self.addrs[self.current], "dataloader stream failed: {why}");
                    if failures >= ROUNDS * self.addrs.len() {
                        return Err(DataError::Service {
                            addr: self.addrs.join(","),
                            reason: format!("every instance failed; last: {why}"),
                        });
                    }
                    self.stream = None;
                    self.skipped = (self.skipped.0 + self.skipped.1, 0);
                    self.current = (self.current + 1) % self.addrs.len();
                    self.failovers += 1;
                    std::thread::sleep(Duration::from_millis(100 * failures as u64));
                }
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<ImageBatch>, Failure> {
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        let stream = self.stream.as_mut().expect("connected");
        let message = runtime::block_on(stream.message());
        match message {
            Ok(Some(batch)) => {
                self.skipped.1 = batch.skipped;
                let batch = self.convert(batch)?;
                self.state = batch.state.clone();
                Ok(Some(batch))
            }
            Ok(None) if self.request.single_epoch => {
                self.stream = None;
                Ok(None)
            }
            Ok(None) => Err(Failure::Retry("stream ended early".into())),
            Err(s) if fatal(s.code()) => {
                Err(Failure::Fatal(self.service_error(s.message().to_string())))
            }
            Err(s) => Err(Failure::Retry(s.to_string())),
        }
    }

    fn connect(&self) -> Result<Streaming<Batch>, Failure> {
        let mut request = self.request.clone();
        request.state = serde_json::to_string(&self.state).expect("state serializes");
        let addr = self.addrs[self.current].clone();
        if let Some(t) = &self.token
            && format!("Bearer {t}")
                .parse::<tonic::metadata::AsciiMetadataValue>()
                .is_err()
        {
            return Err(Failure::Fatal(self.service_error(
                "the cluster token is not a valid header value (visible ASCII only)".into(),
            )));
        }
        let token = AttachToken::new(self.token.as_deref());
        let transport = match &self.transport {
            Ok(t) => t.clone(),
            Err(e) => return Err(Failure::Fatal(self.service_error(e.clone()))),
        };
        let result = runtime::block_on(async move {
            let channel = taming_proto::channel(&addr, &transport, None)
                .await
                .map_err(|e| match e {
                    taming_proto::ConnectError::Tls(e) => Failure::Fatal(DataError::Service {
                        addr: String::new(),
                        reason: e.to_string(),
                    }),
                    e => Failure::Retry(format!("connect: {e}")),
                })?;
            let mut client = DataloaderClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            client
                .stream_batches(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| {
                    if fatal(s.code()) {
                        Failure::Fatal(DataError::Service {
                            addr: String::new(),
                            reason: s.message().to_string(),
                        })
                    } else {
                        Failure::Retry(s.to_string())
                    }
                })
        });
        result.map_err(|f| match f {
            Failure::Fatal(DataError::Service { reason, .. }) => {
                Failure::Fatal(self.service_error(reason))
            }
            other => other,
        })
    }

    fn service_error(&self, reason: String) -> DataError {
        DataError::Service {
            addr: self.addrs[self.current].clone(),
            reason,
        }
    }

    fn convert(&self, b: Batch) -> Result<ImageBatch, Failure> {
        let bad = |why: &str| Failure::Fatal(self.service_error(format!("malformed batch: {why}")));
        let images = b.images.ok_or_else(|| bad("no images"))?;
        let shape: Vec<usize> = images.shape.iter().map(|&d| d as usize).collect();
        let [n, c, h, w] = shape[..] else {
            return Err(bad("images are not 4-d"));
        };
        let values = match DType::try_from(images.dtype) {
            Ok(DType::F32) => images
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
            _ => normalize(&images.data),
        };
        if values.len() != n * c * h * w
            || b.keys.len() != n
            || b.labels.len() != n
            || b.sources.len() != n
        {
            return Err(bad("sizes disagree with the shape"));
        }
        let state = serde_json::from_str(&b.state).map_err(|e| bad(&format!("state: {e}")))?;
        Ok(ImageBatch {
            images: values,
            shape: [n, c, h, w],
            masks: b.masks.map(|m| m.data),
            labels: b.labels.iter().map(|&l| (l >= 0).then_some(l)).collect(),
            keys: b.keys,
            sources: b.sources,
            state,
        })
    }
}

/// Refusals another instance would repeat: a bad request, or a missing or wrong token.
fn fatal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::Unauthenticated
    )
}

enum Failure {
    Retry(String),
    Fatal(DataError),
}

impl BatchSource for RemoteLoader {
    fn next_batch(&mut self) -> Result<ImageBatch, DataError> {
        self.next_in_epoch()?
            .ok_or_else(|| self.service_error("stream ended".into()))
    }

    fn state(&self) -> LoaderState {
        self.state.clone()
    }

    fn skipped(&self) -> u64 {
        self.skipped.0 + self.skipped.1
    }
}
