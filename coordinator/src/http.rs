//! The coordinator's HTTP side (`--http ADDR`): `/metrics` in the Prometheus text format and a
//! status page: `/` lists jobs and workers, `/jobs/{id}` draws a job's loss and codebook-usage
//! curves (SVG) and shows the latest grids its rank 0 wrote (`val_grid.png`, `samples.png`,
//! `loss.png`, read from the run folder). Plain server-rendered HTML; read-only, and no
//! request can reach a file other than those three.

use std::collections::BTreeMap;
use std::fmt::Write;

use taming_proto::job::JobState;
use taming_proto::metrics::{CONTENT_TYPE, Exposition};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::cluster::{HistoryPoint, JobRecord};
use crate::service::{CoordinatorService, Snapshot};

/// Images of a run folder the page may show.
pub const RUN_IMAGES: [&str; 3] = ["val_grid.png", "samples.png", "loss.png"];

/// The routes, over a running service.
pub fn router(service: CoordinatorService) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/{file}", get(run_image))
        .with_state(service)
}

/// Serves the routes on `listener` until `shutdown` completes.
pub async fn serve_http(
    service: CoordinatorService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Steps per second over the last points of a history.
fn step_rate(history: &[HistoryPoint]) -> f64 {
    let recent = &history[history.len().saturating_sub(10)..];
    match (recent.first(), recent.last()) {
        (Some(a), Some(b)) if b.at > a.at => (b.step - a.step) as f64 / (b.at - a.at),
        _ => 0.0,
    }
}

async fn metrics(State(service): State<CoordinatorService>) -> Response {
    let snap = service.snapshot();
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render_metrics(&snap),
    )
        .into_response()
}

/// The Prometheus text exposition of a snapshot.
pub fn render_metrics(snap: &Snapshot) -> String {
    let mut e = Exposition::default();
    e.family("taming_jobs", "gauge", "Jobs by state.");
    for &state in JobState::ALL {
        let n = snap.jobs.iter().filter(|j| j.state == state).count();
        e.sample("taming_jobs", &[("state", state.as_str())], n as f64);
    }
    let busy = snap.workers.iter().filter(|w| w.job.is_some()).count();
    e.family(
        "taming_workers",
        "gauge",
        "Registered workers, busy or idle.",
    )
    .sample("taming_workers", &[("state", "busy")], busy as f64)
    .sample(
        "taming_workers",
        &[("state", "idle")],
        (snap.workers.len() - busy) as f64,
    );
    let running: Vec<&JobRecord> = snap
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .collect();
    e.family("taming_job_step", "gauge", "Latest step of a running job.");
    for j in &running {
        e.sample(
            "taming_job_step",
            &[("job", &j.id), ("stage", j.spec.stage().as_str())],
            j.step as f64,
        );
    }
    e.family(
        "taming_job_steps_per_second",
        "gauge",
        "Step rate of a running job.",
    );
    for j in &running {
        e.sample(
            "taming_job_steps_per_second",
            &[("job", &j.id)],
            step_rate(&j.history),
        );
    }
    e.family(
        "taming_job_samples_per_second",
        "gauge",
        "Images (stage 1) or tokens (stage 2) per second of rank 0.",
    );
    for j in &running {
        e.sample(
            "taming_job_samples_per_second",
            &[("job", &j.id)],
            j.images_per_s,
        );
    }
    e.spans_dropped(taming_telemetry::dropped_spans());
    e.family(
        "taming_job_loss",
        "gauge",
        "Latest losses of a running job.",
    );
    for j in &running {
        for (name, v) in &j.losses {
            e.sample("taming_job_loss", &[("job", &j.id), ("name", name)], *v);
        }
    }
    e.finish()
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.failed{color:#b00}\
.running{color:#070}.late{color:#b60}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>{title}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        title = escape(title)
    ))
}

fn losses_text(losses: &BTreeMap<String, f64>) -> String {
    losses
        .iter()
        .map(|(k, v)| format!("{} {v:.4}", escape(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn index(State(service): State<CoordinatorService>) -> Html<String> {
    let snap = service.snapshot();
    let mut body = String::from(
        "<h1>taming-rs coordinator</h1><h2>Jobs</h2><table><tr><th>job</th><th>stage</th><th>state</th><th>step</th><th>attempt</th><th>workers</th><th>losses</th><th>rate</th><th>message</th></tr>",
    );
    for j in snap.jobs.iter().rev() {
        let id = escape(&j.id);
        let _ = write!(
            body,
            "<tr><td><a href=\"/jobs/{id}\">{id}</a></td><td>{}</td><td class=\"{}\">{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}/s</td><td>{}</td></tr>",
            j.spec.stage(),
            j.state,
            j.state,
            j.step,
            j.spec.steps,
            j.attempt,
            j.workers.len(),
            losses_text(&j.losses),
            j.images_per_s,
            escape(&j.message)
        );
    }
    body.push_str("</table><h2>Workers</h2><table><tr><th>worker</th><th>name</th><th>devices</th><th>job</th><th>last heartbeat</th></tr>");
    for w in &snap.workers {
        let silent = w.seen.elapsed();
        let health = if silent * 2 > snap.heartbeat_timeout {
            "late"
        } else {
            "ok"
        };
        let devices: Vec<String> = w
            .devices
            .iter()
            .map(|(d, bytes)| match bytes {
                0 => escape(d.as_str()),
                b => format!(
                    "{} ({:.1} GiB)",
                    escape(d.as_str()),
                    *b as f64 / (1u64 << 30) as f64
                ),
            })
            .collect();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{health}\">{:.1} s ago ({health})</td></tr>",
            escape(&w.id),
            escape(&w.name),
            devices.join(", "),
            w.job.as_deref().map(escape).unwrap_or_default(),
            silent.as_secs_f64()
        );
    }
    body.push_str("</table>");
    page("taming-rs coordinator", &body)
}

/// One polyline per loss name, each scaled to its own range, over the steps.
pub fn loss_svg(history: &[HistoryPoint]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 260.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\"><rect width=\"{W}\" height=\"{H}\" fill=\"#fff\" stroke=\"#999\"/>",
        H + 20.0 * 4.0,
        H + 80.0
    );
    let (Some(first), Some(last)) = (history.first(), history.last()) else {
        svg.push_str("<text x=\"10\" y=\"20\">no steps reported yet</text></svg>");
        return svg;
    };
    let span = (last.step.saturating_sub(first.step)).max(1) as f64;
    let names: Vec<&String> = last.losses.keys().collect();
    for (n, name) in names.iter().enumerate() {
        let values: Vec<(u64, f64)> = history
            .iter()
            .filter_map(|p| p.losses.get(*name).map(|v| (p.step, *v)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let lo = values.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let hi = values.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
        let range = (hi - lo).max(1e-12);
        let points: Vec<String> = values
            .iter()
            .map(|(s, v)| {
                let x = (s - first.step) as f64 / span * (W - 20.0) + 10.0;
                let y = H - 10.0 - (v - lo) / range * (H - 20.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let color = COLORS[n % COLORS.len()];
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" fill=\"{color}\" font-size=\"13\">{} {:.4} (range {lo:.4} .. {hi:.4})</text>",
            points.join(" "),
            10 + (n % 2) * 360,
            H + 18.0 + (n / 2) as f64 * 18.0,
            escape(name),
            values.last().map_or(0.0, |x| x.1)
        );
    }
    svg.push_str("</svg>");
    svg
}

async fn job_page(State(service): State<CoordinatorService>, Path(id): Path<String>) -> Response {
    let snap = service.snapshot();
    let Some(job) = snap.jobs.iter().find(|j| j.id == id) else {
        return (StatusCode::NOT_FOUND, format!("no job `{id}`\n")).into_response();
    };
    let mut body = format!(
        "<p><a href=\"/\">all jobs</a></p><h1>{} ({})</h1><p class=\"{}\">{} at step {} of {}, attempt {}, {} worker(s): {}</p><p>{}</p><h2>Losses and codebook usage</h2>{}",
        escape(&job.id),
        job.spec.stage(),
        job.state,
        job.state,
        job.step,
        job.spec.steps,
        job.attempt,
        job.workers.len(),
        escape(&job.workers.join(", ")),
        escape(&job.message),
        loss_svg(&job.history)
    );
    let out = std::path::Path::new(&job.spec.out);
    let images: Vec<&str> = RUN_IMAGES
        .into_iter()
        .filter(|f| out.join(f).is_file())
        .collect();
    if !images.is_empty() {
        body.push_str("<h2>Latest grids</h2>");
        for f in images {
            let _ = write!(
                body,
                "<p>{f}<br><img src=\"/jobs/{}/{f}\" alt=\"{f}\"></p>",
                escape(&job.id)
            );
        }
    }
    page(&format!("{} - taming-rs", job.id), &body).into_response()
}

async fn run_image(
    State(service): State<CoordinatorService>,
    Path((id, file)): Path<(String, String)>,
) -> Response {
    if !RUN_IMAGES.contains(&file.as_str()) {
        return (
            StatusCode::NOT_FOUND,
            format!("`{file}` is not a run image\n"),
        )
            .into_response();
    }
    let snap = service.snapshot();
    let Some(job) = snap.jobs.iter().find(|j| j.id == id) else {
        return (StatusCode::NOT_FOUND, format!("no job `{id}`\n")).into_response();
    };
    match std::fs::read(std::path::Path::new(&job.spec.out).join(&file)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, format!("{id} has no {file} yet\n")).into_response(),
    }
}
