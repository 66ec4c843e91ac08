//! The coordinator's HTTP side as an operator meets it: `coordinator serve --http` with a real
//! worker running a job; the status page and `/metrics` while it runs and after, the page in
//! headless Chromium (Debian's `chromium`; the screenshot is kept under
//! `<target>/debug/test-artifacts/`), the run's images, and malformed requests answered with
//! 4xx while the server keeps serving.

use taming_tests::http::{get, request};
use taming_tests::process::{Proc, bin, root, spawn_announcing, tiny_config, wait_for};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "http-test-token";

fn serve(state: &Path) -> (Proc, String, String) {
    let (proc, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--state",
            ])
            .arg(state)
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stderr(Stdio::null()),
        &["coordinator listening on ", "status page on http://"],
    );
    (proc, said[0].clone(), said[1].clone())
}

/// Headless Chromium on `url`: the rendered DOM, and a screenshot written to `shot`.
fn chromium(url: &str, profile: &Path, shot: &Path) -> String {
    let exe = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("Debian's chromium is needed for the page test (scripts/test.sh installs it)");
    let run = |extra: &[&str]| {
        let out = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[
        "--window-size=1000,900",
        &format!("--screenshot={}", shot.display()),
    ]);
    run(&["--dump-dom"])
}

/// Width and height of a PNG, from its IHDR chunk.
fn image_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn status_page_and_metrics_follow_a_running_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, grpc, http) = serve(&tmp.path().join("state"));
    let log = std::fs::File::create(tmp.path().join("worker.log")).unwrap();
    let release = tmp.path().join("release");
    let (_worker, said) = spawn_announcing(
        Command::new(bin("worker"))
            .args([
                "--coordinator",
                &grpc,
                "--name",
                "page-worker",
                "--metrics",
                "127.0.0.1:0",
            ])
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            // Held running at step 5 until the page checks below are done.
            .env("TAMING_FAILPOINT", "hold-at-step:5")
            .env("TAMING_FAILPOINT_RELEASE", &release)
            .stderr(log),
        &["metrics on http://"],
    );
    let worker_http = said[0].trim_end_matches("/metrics").to_string();
    let out = tmp.path().join("run");
    let mut launch = Proc(
        Command::new(bin("coordinator"))
            .args(["launch", "--stage", "vqgan", "--steps", "8", "--quiet"])
            .args([
                "--eval-every",
                "4",
                "--checkpoint-every",
                "4",
                "--coordinator",
                &grpc,
            ])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--data")
            .arg(root().join("data/fashion-mnist"))
            .arg("--out")
            .arg(&out)
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // While it runs (held before reporting step 5): the metrics name the job, its step and
    // losses.
    wait_for(
        "a running job at step 4 in /metrics",
        Duration::from_secs(180),
        || {
            let (code, m) = get(&http, "/metrics");
            code == 200
                && m.contains("taming_jobs{state=\"running\"} 1")
                && m.lines().any(|l| {
                    l.starts_with("taming_job_step{job=\"job-0001\",stage=\"vqgan\"}")
                        && l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()) == Some(4)
                })
        },
    );
    let (_, m) = get(&http, "/metrics");
    for series in [
        "# TYPE taming_jobs gauge",
        "taming_workers{state=\"busy\"} 1",
        "taming_job_steps_per_second{job=\"job-0001\"}",
        "taming_job_samples_per_second{job=\"job-0001\"}",
        "taming_job_loss{job=\"job-0001\",name=\"l1\"}",
        "taming_job_loss{job=\"job-0001\",name=\"usage\"}",
        "taming_spans_dropped_total 0",
    ] {
        assert!(m.contains(series), "{series} missing from\n{m}");
    }
    // The worker's own endpoint: throughput and the step time split.
    let (code, wm) = get(&worker_http, "/metrics");
    assert_eq!(code, 200);
    for series in [
        "taming_worker_samples_per_second{job=\"job-0001\",stage=\"vqgan\"}",
        "taming_worker_step_seconds{phase=\"data_wait\"}",
        "taming_worker_step_seconds{phase=\"compute\"}",
        "taming_worker_step_seconds{phase=\"allreduce\"}",
        "taming_worker_step_seconds_total{phase=\"compute\"}",
    ] {
        assert!(wm.contains(series), "{series} missing from\n{wm}");
    }
    let steps: f64 = wm
        .lines()
        .find_map(|l| l.strip_prefix("taming_worker_steps_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(steps >= 1.0, "{wm}");
    let (code, index) = get(&http, "/");
    assert_eq!(code, 200);
    assert!(
        index.contains("href=\"/jobs/job-0001\"") && index.contains(">running<"),
        "{index}"
    );
    assert!(
        index.contains("page-worker")
            && index.contains("(ok)")
            && index.contains("cpu (")
            && index.contains(" GiB)"),
        "{index}"
    );
    let (code, page) = get(&http, "/jobs/job-0001");
    assert_eq!(code, 200);
    assert!(
        page.contains("<svg") && page.contains("<polyline") && page.contains("usage"),
        "{page}"
    );

    // The page in a real browser, while the job runs.
    let artifacts = bin("coordinator").with_file_name("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let dom = chromium(
        &format!("http://{http}/jobs/job-0001"),
        &tmp.path().join("chromium"),
        &shot,
    );
    assert!(
        dom.contains("job-0001 (vqgan)") && dom.contains("running at step"),
        "{dom}"
    );
    assert!(
        dom.contains("<polyline"),
        "the curves are in the rendered page"
    );
    let (w, h) = image_size(&shot);
    assert!(w >= 800 && h >= 600, "screenshot {w}x{h}");
    eprintln!("status page screenshot: {}", shot.display());

    // Malformed or unknown requests get a 4xx and the server goes on.
    assert_eq!(get(&http, "/jobs/job-0099").0, 404);
    assert_eq!(
        get(&http, "/jobs/job-0001/..%2f..%2fstate%2fjobs.json").0,
        404
    );
    assert_eq!(get(&http, "/jobs/job-0001/checkpoints").0, 404);
    let (code, _) = request(
        &http,
        "BREW / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!((400..500).contains(&code), "method: {code}");
    let (code, _) = request(&http, "GET /\x01\x02 nonsense\r\n\r\n");
    assert!((400..500).contains(&code), "garbage request line: {code}");
    assert_eq!(get(&http, "/").0, 200, "still serving");

    // Released, it finishes: the page shows the run's images, served as PNG.
    std::fs::write(&release, b"").unwrap();
    assert!(launch.0.wait().unwrap().success());
    let (_, page) = get(&http, "/jobs/job-0001");
    assert!(
        page.contains("succeeded") && page.contains("/jobs/job-0001/val_grid.png"),
        "{page}"
    );
    let (code, png) = request(
        &http,
        "GET /jobs/job-0001/val_grid.png HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let (_, m) = get(&http, "/metrics");
    assert!(m.contains("taming_jobs{state=\"succeeded\"} 1"), "{m}");
}

/// Kubernetes probes use the standard gRPC health service: it answers SERVING without the
/// cluster token, while the coordinator's own calls still need it.
#[test]
fn the_grpc_health_service_answers_without_the_token() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, grpc, _) = serve(&tmp.path().join("state"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let reply = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, 1, "SERVING");
        let named = health
            .check(HealthCheckRequest {
                service: "taming.coordinator.v1.Coordinator".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(named.status, 1, "the coordinator service is SERVING");
    });
    let status = Command::new(bin("coordinator"))
        .args(["status", "--coordinator", &grpc])
        .env_remove("TAMING_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(
        !status.status.success(),
        "calls without the token are refused"
    );
}
