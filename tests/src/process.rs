//! The workspace's binaries and checkout, killed-on-drop child processes, a tiny stage-1
//! config and polling with a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary of the workspace (`coordinator`, `worker`, `dataloader`), from the target
/// directory the running test was built in.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("inside a target directory")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// The checkout: the workspace holding the package whose tests run (cargo sets
/// `CARGO_MANIFEST_DIR` when it runs them), else the one this crate was built in. Not only the
/// latter: a build of this crate is reused by checkouts elsewhere sharing a target directory.
pub fn root() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    package
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or(&package)
        .to_path_buf()
}

/// Runs `cmd` to completion and returns its output, failing the test with its stderr unless
/// it exits successfully.
pub fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts `cmd` with its stdout piped and waits for the lines it announces itself with, one
/// per prefix (`coordinator listening on `, `metrics on http://`, ...); returns the process
/// and what follows each prefix (addresses).
pub fn spawn_announcing(cmd: &mut Command, prefixes: &[&str]) -> (Proc, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the process");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let said = prefixes
        .iter()
        .map(|prefix| {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the process ended before saying `{prefix}`"))
                .expect("reading its output");
            line.trim()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected `{prefix}...`, got `{line}`"))
                .to_string()
        })
        .collect();
    (Proc(child), said)
}

/// The `step` column of a run's `metrics.csv`.
pub fn csv_steps(path: &Path) -> Vec<u64> {
    let csv =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    csv_text_steps(&csv)
}

/// The first column of a metrics CSV text, below its header.
pub fn csv_text_steps(csv: &str) -> Vec<u64> {
    csv.lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad metrics row `{l}`"))
        })
        .collect()
}

/// The default stage-1 config made small enough for a job of seconds, written into `dir`.
pub fn tiny_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("configs/stage1/fashion_mnist.yaml"))
        .expect("the default stage-1 config");
    let text = text
        .replace("ch_mult: [1, 2, 2]", "ch_mult: [1, 2]")
        .replace("attn_resolutions: [8]", "attn_resolutions: [16]")
        .replace("batch_size: 16", "batch_size: 4")
        .replace(
            "kmeans_init: {iters: 10, batches: 2}",
            "kmeans_init: {iters: 3, batches: 1}",
        );
    let path = dir.join("tiny.yaml");
    std::fs::write(&path, text).expect("writing the tiny config");
    path
}

/// Polls `ok` until it holds; fails the test naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pids of `parent`'s child processes whose command name is `name` (from `/proc`).
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: `pid (comm) state ppid ...`; comm may hold spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    return false;
                };
                let ppid = stat[close + 1..].split_whitespace().nth(1);
                &stat[open + 1..close] == name && ppid == Some(&parent.to_string())
            })
        })
        .collect()
}

/// Waits for `child` to exit within `timeout` (killing it and failing the test otherwise)
/// and returns its output, stdout and stderr read whole (pipe them).
pub fn finish_within(child: Child, timeout: Duration) -> Output {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + timeout;
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("process {pid} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    waiter
        .join()
        .expect("waiter")
        .expect("the process's output")
}
