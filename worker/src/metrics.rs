//! A worker's Prometheus endpoint (`worker --metrics ADDR`): the job it runs, its throughput
//! and where each step's time goes (waiting for data, computing, all-reduce), per last step
//! and as running totals.

use std::sync::{Arc, Mutex};

use taming_proto::metrics::{CONTENT_TYPE, Exposition};

/// Where one optimizer step's wall time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Waiting for the next batch.
    pub data_wait_s: f64,
    /// Averaging gradients (and broadcasting codebooks) over the group.
    pub allreduce_s: f64,
    /// The whole step.
    pub step_s: f64,
}

impl StepTiming {
    /// The rest: forward, backward, optimizer.
    pub fn compute_s(&self) -> f64 {
        (self.step_s - self.data_wait_s - self.allreduce_s).max(0.0)
    }
}

#[derive(Debug, Default)]
struct State {
    job: String,
    stage: String,
    step: u64,
    rate: f64,
    steps_total: u64,
    last: StepTiming,
    totals: StepTiming,
}

/// What the endpoint shows, updated after every step.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    state: Mutex<State>,
}

impl WorkerMetrics {
    /// Records a finished step of `job`: `rate` samples (images or tokens) per second.
    pub fn record(&self, job: &str, stage: &str, step: u64, rate: f64, timing: StepTiming) {
        let mut s = self.state.lock().expect("metrics lock");
        s.job = job.to_string();
        s.stage = stage.to_string();
        s.step = step;
        s.rate = rate;
        s.steps_total += 1;
        s.last = timing;
        s.totals.data_wait_s += timing.data_wait_s;
        s.totals.allreduce_s += timing.allreduce_s;
        s.totals.step_s += timing.step_s;
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let s = self.state.lock().expect("metrics lock");
        let job = [("job", s.job.as_str()), ("stage", s.stage.as_str())];
        let phases = |t: &StepTiming| {
            [
                ("data_wait", t.data_wait_s),
                ("compute", t.compute_s()),
                ("allreduce", t.allreduce_s),
            ]
        };
        let mut e = Exposition::default();
        e.family(
            "taming_worker_steps_total",
            "counter",
            "Optimizer steps done.",
        )
        .sample("taming_worker_steps_total", &[], s.steps_total as f64)
        .family("taming_worker_step", "gauge", "Step of the current job.")
        .sample("taming_worker_step", &job, s.step as f64)
        .family(
            "taming_worker_samples_per_second",
            "gauge",
            "Images (stage 1) or tokens (stage 2) per second in the last step.",
        )
        .sample("taming_worker_samples_per_second", &job, s.rate);
        e.spans_dropped(taming_telemetry::dropped_spans());
        e.family(
            "taming_worker_step_seconds",
            "gauge",
            "The last step's time by phase.",
        );
        for (phase, v) in phases(&s.last) {
            e.sample("taming_worker_step_seconds", &[("phase", phase)], v);
        }
        e.family(
            "taming_worker_step_seconds_total",
            "counter",
            "Step time by phase since start.",
        );
        for (phase, v) in phases(&s.totals) {
            e.sample("taming_worker_step_seconds_total", &[("phase", phase)], v);
        }
        e.finish()
    }
}

/// Serves `GET /metrics` on a bound listener.
pub async fn serve_metrics(
    metrics: Arc<WorkerMetrics>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text) }
        }),
    );
    axum::serve(listener, app).await
}
