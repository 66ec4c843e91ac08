//! A span processor with a bounded queue that counts what it drops: finished spans wait in a
//! queue of at most `capacity`, a background thread exports them in batches every `delay`
//! (or as soon as a batch is full), and a span that finds the queue full is dropped and
//! counted ([`dropped_spans`]), so that a slow or unreachable collector never blocks the
//! code that made the span.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans dropped because the export queue was full, since the process started.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans per export call.
const BATCH: usize = 512;

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<VecDeque<SpanData>>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The processor.
#[derive(Debug)]
pub struct BoundedProcessor<E: SpanExporter + 'static> {
    shared: Arc<Shared>,
    exporter: Arc<Mutex<E>>,
    capacity: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<E: SpanExporter + 'static> BoundedProcessor<E> {
    /// Starts the export thread.
    pub fn new(exporter: E, capacity: usize, delay: Duration) -> Self {
        let shared = Arc::new(Shared::default());
        let exporter = Arc::new(Mutex::new(exporter));
        let (s, e) = (shared.clone(), exporter.clone());
        let thread = std::thread::Builder::new()
            .name("taming-otlp".into())
            .spawn(move || export_loop(&s, &e, delay))
            .expect("span export thread");
        Self {
            shared,
            exporter,
            capacity,
            thread: Mutex::new(Some(thread)),
        }
    }
}

fn export_loop<E: SpanExporter>(s: &Shared, exporter: &Mutex<E>, delay: Duration) {
    loop {
        let batch: Vec<SpanData> = {
            let q = s.queue.lock().expect("span queue");
            let (mut q, _) = s
                .wake
                .wait_timeout_while(q, delay, |q| {
                    q.len() < BATCH && !s.stop.load(Ordering::Relaxed)
                })
                .expect("span queue");
            let n = q.len().min(BATCH);
            q.drain(..n).collect()
        };
        if !batch.is_empty() {
            let exporter = exporter.lock().expect("exporter");
            let _ = futures_executor::block_on(exporter.export(batch));
        }
        if s.stop.load(Ordering::Relaxed) && s.queue.lock().expect("span queue").is_empty() {
            return;
        }
    }
}

impl<E: SpanExporter + 'static> SpanProcessor for BoundedProcessor<E> {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let mut q = self.shared.queue.lock().expect("span queue");
        if q.len() >= self.capacity {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(span);
        if q.len() >= BATCH {
            self.shared.wake.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.shared.wake.notify_one();
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().expect("thread").take() {
            let _ = t.join();
        }
        Ok(())
    }

    /// The resource (service.name) goes to the exporter, which puts it on every batch.
    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.exporter
            .lock()
            .expect("exporter")
            .set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Tracer, TracerProvider};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// An exporter that takes 300 ms per call, like a collector that hardly answers.
    #[derive(Debug, Default, Clone)]
    struct Stuck(Arc<AtomicU64>);

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            std::thread::sleep(Duration::from_millis(300));
            self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let exported = Stuck::default();
        let processor = BoundedProcessor::new(exported.clone(), 8, Duration::from_millis(10));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        let before = dropped_spans();
        for _ in 0..100 {
            tracer.in_span("work", |_| {});
        }
        let _ = provider.shutdown();
        let dropped = dropped_spans() - before;
        let sent = exported.0.load(Ordering::Relaxed);
        assert_eq!(dropped + sent, 100, "every span is exported or counted");
        // Had a full queue made callers wait for the collector, nothing would be dropped.
        assert!(dropped >= 80, "{dropped} dropped");
    }
}
