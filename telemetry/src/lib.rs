//! Logs and traces of the taming-rs services. [`init`] installs human-readable logs (or JSON
//! lines) on stderr and, when an OTLP endpoint is given (`--otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`; OTLP over HTTP/protobuf), an OpenTelemetry layer whose
//! spans go out through a bounded queue ([`queue`]): an unreachable collector costs dropped
//! spans, counted by [`dropped_spans`], never a blocked caller. [`traced`] and [`adopt`] carry
//! the W3C trace context in gRPC metadata, so that a worker's step and the coordinator's
//! handling of its report are one trace.

pub mod queue;
pub use queue::dropped_spans;

use std::process::ExitCode;

use anyhow::Context as _;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Spans waiting for export at most; beyond, new spans are dropped.
pub const QUEUE_SPANS: usize = 4096;

/// How a service logs and traces.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `service.name` of the spans (taming-coordinator, taming-worker, taming-dataloader).
    pub service: &'static str,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; none: no spans exported.
    pub otlp_endpoint: Option<String>,
    /// JSON lines instead of human-readable logs.
    pub json_logs: bool,
    /// Log filter when `RUST_LOG` is not set.
    pub default_filter: &'static str,
}

/// Keeps the exporter alive; flushes what it can when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber (call once, at the start of `main`).
pub fn init(opts: &Options) -> anyhow::Result<Telemetry> {
    let filter = || {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(opts.default_filter))
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = if opts.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    };
    let registry = tracing_subscriber::registry().with(logs);
    let Some(endpoint) = opts.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        registry.try_init()?;
        return Ok(Telemetry { provider: None });
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // OTLP over HTTP/protobuf (port 4318): its blocking client suits the batch processor's
    // own thread. A bare `http://host:port` gets the traces path.
    let url = if endpoint.trim_end_matches('/').matches('/').count() <= 2 {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_string()
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(std::time::Duration::from_secs(3))
        .build()
        .with_context(|| {
            format!("--otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) {endpoint:?}")
        })?;
    let queue =
        queue::BoundedProcessor::new(exporter, QUEUE_SPANS, std::time::Duration::from_millis(500));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(queue)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(opts.service)
                .build(),
        )
        .build();
    let tracer = provider.tracer(opts.service);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new("info"));
    registry.with(traces).try_init()?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the current span's trace context into `request`'s metadata (`traceparent`).
pub fn inject<T>(request: &mut tonic::Request<T>) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new()
        .inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
}

/// A request wrapped with the current trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject(&mut request);
    request
}

/// Makes `span` a child of the trace context carried by `metadata`, if any.
pub fn adopt(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(parent);
}

/// The command-line flags every service takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Export spans to this OTLP/HTTP collector (e.g. http://otel-collector:4318); off when
    /// absent.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

impl TelemetryArgs {
    /// [`init`] with these flags.
    pub fn init(
        &self,
        service: &'static str,
        default_filter: &'static str,
    ) -> anyhow::Result<Telemetry> {
        init(&Options {
            service,
            otlp_endpoint: self.otlp_endpoint.clone(),
            json_logs: self.log_json,
            default_filter,
        })
    }

    /// A service's `main`: telemetry is on while `body` runs; an error, telemetry's or the
    /// body's, is printed as one `error: ...` line and the exit code is a failure.
    pub fn main(
        self,
        service: &'static str,
        default_filter: &'static str,
        body: impl FnOnce() -> anyhow::Result<ExitCode>,
    ) -> ExitCode {
        let _telemetry = match self.init(service, default_filter) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: telemetry: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        body().unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        })
    }
}
