//! The cluster as operators run it: `coordinator serve`, `worker --coordinator` processes,
//! `coordinator launch|status|cancel --coordinator`; a worker killed or hung mid-job, a job
//! cancelled mid-run, a coordinator restarted mid-run; the token.

use taming_tests::http::metric;
use taming_tests::process::{
    Proc, bin, csv_steps, free_port, root, spawn_announcing, succeed, tiny_config, wait_for,
};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "test-token";

fn serve(state: &Path) -> (Proc, String) {
    serve_with(state, &[])
}

fn serve_with(state: &Path, extra: &[&str]) -> (Proc, String) {
    serve_at("127.0.0.1:0", state, extra)
}

/// `coordinator serve` bound to `bind`, keeping its jobs in `state`; the process and its
/// address.
fn serve_at(bind: &str, state: &Path, extra: &[&str]) -> (Proc, String) {
    let (proc, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args([
                "serve",
                "--bind",
                bind,
                "--heartbeat-timeout",
                "3",
                "--state",
            ])
            .arg(state)
            .args(extra)
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    (proc, said[0].clone())
}

fn worker(addr: &str, name: &str, token: &str, log: &Path) -> Proc {
    worker_with(addr, name, token, log, &[])
}

fn worker_with(addr: &str, name: &str, token: &str, log: &Path, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(bin("worker"))
            .args(["--coordinator", addr, "--name", name])
            .args(extra)
            .env("TAMING_CLUSTER_TOKEN", token)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn coordinator(addr: &str) -> Command {
    let mut c = Command::new(bin("coordinator"));
    c.env("TAMING_CLUSTER_TOKEN", TOKEN);
    c.arg("--token").arg(TOKEN);
    let _ = addr;
    c
}

#[test]
fn a_job_survives_a_killed_worker_and_finishes_with_one_continuous_step_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let _a = worker(&addr, "a", TOKEN, &tmp.path().join("a.log"));
    let mut b = worker(&addr, "b", TOKEN, &tmp.path().join("b.log"));
    let out = tmp.path().join("run");
    let launch = coordinator(&addr)
        .args("launch --stage vqgan --nodes 2 --min-nodes 1 --steps 24".split_whitespace())
        .args([
            "--checkpoint-every",
            "4",
            "--eval-every",
            "4",
            "--quiet",
            "--coordinator",
            &addr,
        ])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a checkpoint", Duration::from_secs(240), || {
        out.join("checkpoints/latest").exists()
    });
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    let result = launch.wait_with_output_timeout();
    assert!(result.0, "launch failed:\n{}\n{}", result.1, result.2);
    assert!(
        result.1.contains("succeeded") && result.1.contains("attempt 2"),
        "{}",
        result.1
    );
    let steps = csv_steps(&out.join("metrics.csv"));
    assert_eq!(
        steps,
        (1..=24).collect::<Vec<u64>>(),
        "one continuous step count"
    );
    assert!(out.join("model/model.safetensors").is_file());
}

/// A rank that hangs (its training stops at step 3 while its heartbeat thread goes on) is
/// taken for hung after the progress timeout: its worker is dropped, and the job resumes on
/// the other worker from its checkpoint, with one continuous step count.
#[test]
fn a_hung_worker_is_dropped_and_the_job_finishes_on_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve_with(&tmp.path().join("state"), &["--progress-timeout", "10"]);
    // The other rank waits for the hung one in its all-reduce longer than the progress
    // timeout: the coordinator, not the collective, ends the attempt.
    let quick = ["--collective-timeout", "40"];
    let hung_log = tmp.path().join("hung.log");
    let _hung = {
        let log = std::fs::File::create(&hung_log).unwrap();
        Proc(
            Command::new(bin("worker"))
                .args(["--coordinator", &addr, "--name", "hung"])
                .args(quick)
                .env("TAMING_CLUSTER_TOKEN", TOKEN)
                .env("TAMING_FAILPOINT", "hang-at-step:3")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let _ok = worker_with(&addr, "ok", TOKEN, &tmp.path().join("ok.log"), &quick);
    let out = tmp.path().join("run");
    let launch = coordinator(&addr)
        .args("launch --stage vqgan --nodes 2 --min-nodes 1 --steps 8 --quiet".split_whitespace())
        .args([
            "--checkpoint-every",
            "2",
            "--eval-every",
            "8",
            "--coordinator",
            &addr,
        ])
        // A failure of this test ends instead of waiting for workers forever.
        .args(["--placement-timeout", "120"])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let result = launch.wait_with_output_timeout();
    let ok_log = std::fs::read_to_string(tmp.path().join("ok.log")).unwrap_or_default();
    assert!(
        result.0,
        "launch failed:\n{}\n{}\nthe ok worker's log:\n{ok_log}",
        result.1, result.2
    );
    assert!(
        result.2.contains("showed no progress") && result.2.contains("(hung;"),
        "launch says why the first attempt ended: {}",
        result.2
    );
    assert!(
        result.1.contains("succeeded attempt 2 on 1 worker(s)"),
        "{}",
        result.1
    );
    let hung = std::fs::read_to_string(&hung_log).unwrap();
    assert!(hung.contains("hanging at step 3"), "{hung}");
    assert_eq!(
        csv_steps(&out.join("metrics.csv")),
        (1..=8).collect::<Vec<u64>>()
    );
}

/// A `dataloader serve` process, its address and its metrics address.
fn dataloader(log: &Path) -> (Proc, String, String) {
    let log = std::fs::File::create(log).unwrap();
    let (proc, said) = spawn_announcing(
        Command::new(bin("dataloader"))
            .args(["serve", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--data-root")
            .arg(root().join("data"))
            .stderr(log),
        &["listening on ", "metrics on http://"],
    );
    let metrics = said[1].trim_end_matches("/metrics").to_string();
    (proc, said[0].clone(), metrics)
}

/// Batches a dataloader has sent, from its /metrics.
fn batches_sent(metrics_addr: &str) -> f64 {
    metric(metrics_addr, "taming_dataloader_batches_total").expect("the batch counter")
}

/// A dataloader service killed in the middle of a job: the worker's client moves to the other
/// one and resumes from the last batch it got, so the job goes on in the same attempt.
#[test]
fn a_job_survives_a_killed_dataloader_service() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let (mut first, first_addr, first_metrics) = dataloader(&tmp.path().join("dl-a.log"));
    let (_second, second_addr, second_metrics) = dataloader(&tmp.path().join("dl-b.log"));
    let _w = worker(&addr, "w", TOKEN, &tmp.path().join("w.log"));
    let out = tmp.path().join("run");
    let launch = coordinator(&addr)
        .args(["launch", "--stage", "vqgan", "--steps", "150", "--quiet"])
        .args([
            "--checkpoint-every",
            "50",
            "--eval-every",
            "50",
            "--coordinator",
            &addr,
        ])
        .arg("--dataloader-addrs")
        .arg(format!("{first_addr},{second_addr}"))
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--data")
        .arg(root().join("data/fashion-mnist"))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = || {
        let out = coordinator(&addr)
            .args(["status", "--coordinator", &addr])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("a few steps", Duration::from_secs(240), || {
        status()
            .split_whitespace()
            .skip_while(|w| *w != "step")
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 3)
    });
    assert!(
        batches_sent(&first_metrics) > 0.0,
        "the first service was in use"
    );
    assert_eq!(batches_sent(&second_metrics), 0.0);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let result = launch.wait_with_output_timeout();
    assert!(result.0, "launch failed:\n{}\n{}", result.1, result.2);
    assert!(
        result.1.contains("succeeded") && result.1.contains("attempt 1"),
        "{}",
        result.1
    );
    let steps = csv_steps(&out.join("metrics.csv"));
    assert_eq!(steps, (1..=150).collect::<Vec<u64>>());
    assert!(
        batches_sent(&second_metrics) > 0.0,
        "the second service took over"
    );
}

trait WaitTimeout {
    fn wait_with_output_timeout(self) -> (bool, String, String);
}

impl WaitTimeout for Child {
    fn wait_with_output_timeout(self) -> (bool, String, String) {
        let out = self.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn status_and_cancel_work_against_a_running_coordinator_and_jobs_survive_its_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (coord, addr) = serve(&state);
    // No workers: the job waits in the queue.
    let submit = coordinator(&addr)
        .args([
            "launch",
            "--stage",
            "vqgan",
            "--nodes",
            "3",
            "--steps",
            "5",
            "--coordinator",
            &addr,
        ])
        .arg("--out")
        .arg(tmp.path().join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _submit = Proc(submit);
    let status = || {
        let out = succeed(coordinator(&addr).args(["status", "--coordinator", &addr]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the job", Duration::from_secs(30), || {
        status().contains("job-0001")
    });
    assert!(status().contains("pending"), "{}", status());
    drop(coord);
    let (_coord, addr) = serve(&state);
    let status = coordinator(&addr)
        .args(["status", "--coordinator", &addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("job-0001") && text.contains("pending"),
        "kept across a restart: {text}"
    );
    let cancel = coordinator(&addr)
        .args(["cancel", "job-0001", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("cancelled"));
    let missing = coordinator(&addr)
        .args(["cancel", "job-9999", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("job-9999"));
}

/// A `launch` of the tiny stage-1 config into `out` with these extra flags, followed.
fn launch_tiny(addr: &str, dir: &Path, out: &Path, extra: &[&str]) -> Child {
    coordinator(addr)
        .args("launch --stage vqgan --nodes 1 --quiet --coordinator".split_whitespace())
        .arg(addr)
        .args(extra)
        .arg("--config")
        .arg(tiny_config(dir))
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the log file `log` says `what`; fails the test showing the log after `timeout`.
fn wait_for_log(log: &Path, what: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for `{what}` in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Steps written to a run's metrics so far (none before the file exists).
fn steps_so_far(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.csv"))
        .map_or(0, |t| t.lines().count().saturating_sub(1))
}

/// Cancelling a running job: its worker stops at its next heartbeat or step, `launch` says
/// cancelled, and the same worker (idle again) runs the next job.
#[test]
fn a_running_job_is_cancelled_and_its_worker_runs_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let log = tmp.path().join("w.log");
    let _w = worker(&addr, "w", TOKEN, &log);
    let long = tmp.path().join("long");
    let first = launch_tiny(
        &addr,
        tmp.path(),
        &long,
        &["--steps", "400", "--eval-every", "400"],
    );
    wait_for("two steps", Duration::from_secs(120), || {
        steps_so_far(&long) >= 2
    });
    let cancel = succeed(coordinator(&addr).args(["cancel", "job-0001", "--coordinator", &addr]));
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("cancelled"));
    let first = first.wait_with_output_timeout();
    assert!(!first.0, "a cancelled job is not a success: {}", first.1);
    assert!(first.2.contains("cancelled"), "{}", first.2);
    let short = tmp.path().join("short");
    let second = launch_tiny(
        &addr,
        tmp.path(),
        &short,
        &[
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--placement-timeout",
            "60",
        ],
    )
    .wait_with_output_timeout();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        second.0,
        "{}\n{}\nthe worker's log:\n{log}",
        second.1, second.2
    );
    assert_eq!(csv_steps(&short.join("metrics.csv")), vec![1, 2]);
    let stopped = steps_so_far(&long);
    assert!(
        (2..400).contains(&stopped),
        "the cancelled job stopped: {stopped} steps"
    );
    assert!(
        !long.join("model").exists(),
        "a cancelled run exports no model"
    );
}

/// A coordinator restarted while a job runs: the worker, told that the new coordinator does
/// not know it, stops the job at its next step and registers again; the job resumes on it
/// from its checkpoint with one continuous step count, and `launch` follows it throughout.
#[test]
fn a_running_job_resumes_after_a_coordinator_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let bind = format!("127.0.0.1:{}", free_port());
    let (coord, addr) = serve_at(&bind, &state, &[]);
    let release = tmp.path().join("release");
    let log = tmp.path().join("w.log");
    let _w = {
        let file = std::fs::File::create(&log).unwrap();
        Proc(
            Command::new(bin("worker"))
                .args(["--coordinator", &addr, "--name", "w"])
                .env("TAMING_CLUSTER_TOKEN", TOKEN)
                .env("TAMING_FAILPOINT", "hold-at-step:4")
                .env("TAMING_FAILPOINT_RELEASE", &release)
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap(),
        )
    };
    let out = tmp.path().join("run");
    let launch = launch_tiny(
        &addr,
        tmp.path(),
        &out,
        &[
            "--steps",
            "8",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "8",
            "--placement-timeout",
            "60",
        ],
    );
    wait_for_log(&log, "held at step 4", Duration::from_secs(120));
    drop(coord);
    let (_coord, _) = serve_at(&bind, &state, &[]);
    wait_for_log(&log, "heartbeat refused", Duration::from_secs(60));
    std::fs::write(&release, b"").unwrap();
    let result = launch.wait_with_output_timeout();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        result.0,
        "{}\n{}\nthe worker's log:\n{text}",
        result.1, result.2
    );
    assert!(result.1.contains("succeeded attempt 2"), "{}", result.1);
    assert!(text.contains("registering again"), "{text}");
    assert_eq!(
        csv_steps(&out.join("metrics.csv")),
        (1..=8).collect::<Vec<u64>>()
    );
    assert!(out.join("model/model.safetensors").is_file());
}

#[test]
fn workers_and_clients_without_the_token_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let log = tmp.path().join("w.log");
    let mut w = worker(&addr, "intruder", "wrong-token", &log);
    let status = w.0.wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("wrong cluster token"), "{text}");
    let out = Command::new(bin("coordinator"))
        .args(["status", "--coordinator", &addr])
        .env_remove("TAMING_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing cluster token"));
}

/// Workers set up as compose and Kubernetes set them up (`--ring-bind 0.0.0.0:7000
/// --advertise worker-0:7000`): each advertises its ring under a host name, here
/// `localhost:PORT`, with one compute thread. The coordinator takes the names, the ranks dial
/// them, and a two-node job trains.
#[test]
fn workers_advertising_host_names_train_a_two_node_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let _workers: Vec<Proc> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let port = free_port();
            let (bind, advertise) = (format!("127.0.0.1:{port}"), format!("localhost:{port}"));
            let log = tmp.path().join(format!("{name}.log"));
            let ring = ["--ring-bind", &bind, "--advertise", &advertise];
            worker_with(
                &addr,
                name,
                TOKEN,
                &log,
                &[&ring[..], &["--threads", "1"]].concat(),
            )
        })
        .collect();
    launch_two_node_job(&addr, tmp.path());
}

/// A three-step, two-node `launch` of the tiny stage-1 config on the coordinator at `addr`,
/// into `dir/run`: it succeeds with one continuous step count.
fn launch_two_node_job(addr: &str, dir: &Path) {
    let out = dir.join("run");
    let launch = succeed(
        coordinator(addr)
            .args("launch --stage vqgan --nodes 2 --steps 3 --quiet".split_whitespace())
            .args(["--eval-every", "3", "--checkpoint-every", "3"])
            .args(["--coordinator", addr])
            .arg("--config")
            .arg(tiny_config(dir))
            .arg("--out")
            .arg(&out),
    );
    let said = String::from_utf8_lossy(&launch.stdout);
    assert!(said.contains("succeeded"), "{said}");
    assert_eq!(csv_steps(&out.join("metrics.csv")), vec![1, 2, 3]);
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next())
            == Some("Z")
    })
}

/// `worker --nproc-per-node 2`: one worker process per local rank (`node-0`, `node-1`, each
/// with its own ring port and one compute thread), a two-node job trains on them, and killing
/// the node's process stops both.
#[test]
fn one_worker_with_two_local_ranks_trains_a_two_node_job_and_dies_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, addr) = serve(&tmp.path().join("state"));
    let log = tmp.path().join("node.log");
    let node = worker_with(&addr, "node", TOKEN, &log, &["--nproc-per-node", "2"]);
    launch_two_node_job(&addr, tmp.path());
    let text = std::fs::read_to_string(&log).unwrap();
    for rank in ["local rank 0: node-0", "local rank 1: node-1"] {
        assert!(text.contains(rank), "{rank} missing from:\n{text}");
    }
    let ranks = taming_tests::process::children_named(node.0.id(), "worker");
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    drop(node);
    wait_for(
        "the local ranks to die with their node",
        Duration::from_secs(15),
        || ranks.iter().all(|&pid| gone(pid)),
    );
}

/// A local rank that cannot start (its ring port is taken) stops the node: the other rank is
/// stopped and the node exits naming the one that failed.
#[test]
fn a_local_rank_that_fails_stops_the_node_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let run = Command::new(bin("worker"))
        .args([
            "--coordinator",
            "127.0.0.1:9",
            "--name",
            "node",
            "--nproc-per-node",
            "2",
        ])
        .args(["--ring-bind", &bind, "--insecure"])
        .env("TAMING_CLUSTER_TOKEN", TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("local rank 0 (node-0) exited with"), "{err}");
    assert!(err.contains(&format!("binding {bind}")), "{err}");
}

#[test]
fn a_malformed_advertised_address_stops_the_worker_naming_the_flag() {
    let run = Command::new(bin("worker"))
        .args([
            "--coordinator",
            "127.0.0.1:9",
            "--advertise",
            "bad host:7000",
        ])
        .env("TAMING_CLUSTER_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--advertise") && stderr.contains("bad host"),
        "{stderr}"
    );
}

/// A ring bound to every interface without `--advertise` is registered as `0.0.0.0:PORT`,
/// which peers on other machines cannot dial: the worker says so as it starts.
#[test]
fn a_ring_on_every_interface_without_advertise_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("w.log");
    let _w = worker_with(
        "127.0.0.1:9",
        "w",
        TOKEN,
        &log,
        &["--ring-bind", "0.0.0.0:0"],
    );
    wait_for("the warning", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("without --advertise") && text.contains("0.0.0.0:")
    });
}
