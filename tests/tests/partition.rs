//! A network partition between the workers of a job, made with a network namespace: worker
//! `a` runs in a namespace of its own, joined to this host by a veth pair (10.213.7.2 there,
//! 10.213.7.1 here, addresses of this test's own hosts), worker `h` and the coordinator on the
//! host. Once the job has a checkpoint, `a`'s link goes down: it can reach neither the
//! coordinator nor its ring peer, but it keeps running. The coordinator drops it, and the job
//! fails over to `h` and completes with one continuous step count.
//!
//! Needs root (CI runs as root) and iproute2's `ip`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use taming_tests::process::{Proc, bin, csv_steps, spawn_announcing, tiny_config, wait_for};

const TOKEN: &str = "partition-token";

/// Runs `ip ARGS`, failing the test with its stderr.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one veth link to this host, removed (with the link) when dropped.
struct Namespace {
    name: String,
}

impl Namespace {
    fn new(name: &str, host_ip: &str, ns_ip: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let (host_if, ns_if) = (format!("{name}-h"), format!("{name}-n"));
        ip(&["netns", "add", name]);
        let ns = Self { name: name.into() };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ns.exec_ip(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        ns.exec_ip(&["link", "set", &ns_if, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Cuts the namespace off: its end of the link goes down.
    fn partition(&self) {
        self.exec_ip(&["link", "set", &format!("{}-n", self.name), "down"]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}-h", self.name)])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A worker process named `name` with its ring on `ring`, in namespace `ns` when given.
fn worker(ns: Option<&str>, name: &str, coordinator: &str, ring: &str, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("worker"));
            c
        }
        None => Command::new(bin("worker")),
    };
    Proc(
        cmd.args(["--coordinator", coordinator, "--name", name, "--insecure"])
            .args([
                "--ring-bind",
                &format!("{ring}:0"),
                "--collective-timeout",
                "10",
            ])
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_partitioned_worker_is_dropped_and_the_job_completes_on_the_rest() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test makes a network namespace: run it as root (CI does)"
    );
    let ns = Namespace::new(
        &format!("tp{}", std::process::id() % 100_000),
        "10.213.7.1",
        "10.213.7.2",
    );
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args([
                "serve",
                "--bind",
                "10.213.7.1:0",
                "--heartbeat-timeout",
                "3",
                "--insecure",
            ])
            .arg("--state")
            .arg(tmp.path().join("state"))
            .env("TAMING_CLUSTER_TOKEN", TOKEN)
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    let addr = said[0].clone();
    let _a = worker(
        Some(&ns.name),
        "a",
        &addr,
        "10.213.7.2",
        &tmp.path().join("a.log"),
    );
    let _h = worker(None, "h", &addr, "10.213.7.1", &tmp.path().join("h.log"));
    let out = tmp.path().join("run");
    let launch = Command::new(bin("coordinator"))
        .args(
            "launch --stage vqgan --nodes 2 --min-nodes 1 --steps 16 --quiet --insecure"
                .split_whitespace(),
        )
        .args([
            "--checkpoint-every",
            "2",
            "--eval-every",
            "16",
            "--placement-timeout",
            "120",
        ])
        .args(["--coordinator", &addr])
        .arg("--config")
        .arg(tiny_config(tmp.path()))
        .arg("--out")
        .arg(&out)
        .env("TAMING_CLUSTER_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a checkpoint", Duration::from_secs(240), || {
        out.join("checkpoints/latest").exists()
    });
    ns.partition();
    let done = taming_tests::process::finish_within(launch, Duration::from_secs(400));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
    );
    assert!(done.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("on 1 worker(s)"),
        "resumed on the host's worker: {stdout}"
    );
    assert!(
        stderr.contains("attempt 1:"),
        "the first attempt's end is shown: {stderr}"
    );
    assert_eq!(
        csv_steps(&out.join("metrics.csv")),
        (1..=16).collect::<Vec<u64>>()
    );
}
