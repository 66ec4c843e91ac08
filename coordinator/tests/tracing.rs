//! Traces across processes: `coordinator serve` and a `worker` export spans over OTLP/HTTP to
//! a receiver in this test (decoded with opentelemetry-proto); a worker's step and the
//! coordinator's handling of that step's progress report are one trace, parent and child. A
//! collector that cannot be reached does not stop training; an address that is not a URL stops
//! every service at once.

use taming_tests::process::{Proc, bin, root, spawn_announcing, succeed, tiny_config};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

const TOKEN: &str = "trace-test-token";

/// One received span.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

type Store = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver on a free port; returns its base URL.
fn receiver(rt: &tokio::runtime::Runtime, store: Store) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Received {
                                service: service.clone(),
                                name: s.name,
                                trace: s.trace_id,
                                id: s.span_id,
                                parent: s.parent_span_id,
                            });
                        }
                    }
                }
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[test]
fn a_step_and_its_report_are_one_trace_across_worker_and_coordinator() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store: Store = Arc::default();
    let otlp = receiver(&rt, store.clone());
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args(["serve", "--bind", "127.0.0.1:0", "--state"])
            .arg(tmp.path().join("state"))
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    let grpc = said[0].clone();
    let _worker = Proc(
        Command::new(bin("worker"))
            .args([
                "--coordinator",
                &grpc,
                "--name",
                "traced",
                "--otlp-endpoint",
                &otlp,
            ])
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    succeed(
        Command::new(bin("coordinator"))
            .args([
                "launch",
                "--stage",
                "vqgan",
                "--steps",
                "3",
                "--quiet",
                "--coordinator",
                &grpc,
            ])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--data")
            .arg(root().join("data/fashion-mnist"))
            .arg("--out")
            .arg(tmp.path().join("run"))
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    );

    // Spans leave in batches every half second; wait for a linked pair.
    let deadline = Instant::now() + Duration::from_secs(60);
    let linked = loop {
        let spans = store.lock().unwrap().clone();
        let pair = spans
            .iter()
            .filter(|s| s.service == "taming-coordinator" && s.name == "ReportProgress")
            .find_map(|report| {
                spans
                    .iter()
                    .find(|s| {
                        s.service == "taming-worker"
                            && s.name == "step"
                            && s.id == report.parent
                            && s.trace == report.trace
                    })
                    .map(|step| (step.clone(), report.clone()))
            });
        // The job span closes, and is exported, after the last step: wait for it too.
        let job_done = spans
            .iter()
            .any(|s| s.service == "taming-worker" && s.name == "job");
        if let (Some(pair), true) = (pair, job_done) {
            break (pair, spans);
        }
        assert!(
            Instant::now() < deadline,
            "no coordinator span with a worker step as parent, or no job span, among {spans:#?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let ((step, _report), spans) = linked;
    // Within the worker: the step belongs to the job's trace and holds the all-reduce.
    let job = spans
        .iter()
        .find(|s| s.service == "taming-worker" && s.name == "job")
        .expect("a job span");
    assert_eq!(job.trace, step.trace, "the step is part of the job's trace");
    assert!(
        spans
            .iter()
            .any(|s| s.name == "allreduce" && s.parent == step.id),
        "all-reduce inside the step"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == "data_wait" && s.parent == step.id)
    );
}

#[test]
fn an_unreachable_collector_does_not_stop_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeed(
        Command::new(bin("worker"))
            .args(["--otlp-endpoint", "http://127.0.0.1:9", "--log-json"])
            .args(["train", "--stage", "vqgan", "--steps", "3", "--quiet"])
            .args(["--eval-every", "3", "--checkpoint-every", "3"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--out")
            .arg(&out),
    );
    assert!(out.join("model/model.safetensors").is_file());
}

/// A collector address that is not a URL stops each service before it does anything, with one
/// error line naming the flag and the address.
#[test]
fn a_malformed_collector_address_is_refused_by_every_service() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_arg = out.to_str().unwrap();
    let commands = [
        (
            "coordinator",
            vec!["status", "--coordinator", "http://127.0.0.1:9"],
        ),
        ("dataloader", vec!["serve", "--bind", "127.0.0.1:0"]),
        (
            "worker",
            vec!["train", "--stage", "vqgan", "--out", out_arg],
        ),
    ];
    for (name, args) in commands {
        let run = Command::new(bin(name))
            .args(["--otlp-endpoint", "http://bad host:4318"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.starts_with("error: telemetry: --otlp-endpoint")
                && stderr.contains("\"http://bad host:4318\""),
            "{name}: {stderr}"
        );
        assert!(!out.exists(), "{name} wrote its run folder");
    }
}

/// On the local mini-cluster every service traces: the dataloader's shard reads,
/// the worker's steps and the coordinator's handlers, all to one collector.
#[test]
fn the_mini_cluster_traces_all_three_services() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store: Store = Arc::default();
    let otlp = receiver(&rt, store.clone());
    let tmp = tempfile::tempdir().unwrap();
    succeed(
        Command::new(bin("coordinator"))
            .args(["launch", "--stage", "vqgan", "--steps", "4", "--quiet"])
            .args(["--eval-every", "4", "--checkpoint-every", "4"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--out")
            .arg(tmp.path().join("run"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
    );
    // (The dataloader's `StreamBatches` span covers the whole stream: it ends, and is
    // exported, only when the stream does; its per-batch `shard_read` children are sent as
    // they finish.)
    let want = [
        ("taming-dataloader", "shard_read"),
        ("taming-worker", "step"),
        ("taming-coordinator", "ReportProgress"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = store.lock().unwrap().clone();
        let missing: Vec<_> = want
            .iter()
            .filter(|(svc, name)| !spans.iter().any(|s| &s.service == svc && &s.name == name))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "missing spans {missing:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}
