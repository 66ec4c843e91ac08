//! Storage servers the tests start (moto for S3, Azurite for Azure Blob): each once per test
//! binary, on a free loopback port, killed with the test process.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::free_port;

/// The server program: `$VAR` when set, else `cached` under `~/.cache/taming-rs` (where
/// scripts/test.sh installs it), else `name` from PATH.
pub fn program(var: &str, cached: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return p.into();
    }
    let path = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/taming-rs")
        .join(cached);
    if path.exists() {
        return path;
    }
    PathBuf::from(name)
}

/// Starts `cmd` with the port `args` gives it and waits until it accepts connections;
/// returns the port. The server dies with the thread that started it (PR_SET_PDEATHSIG),
/// so that thread lives as long as the test process. Its stderr goes to a log in the temp
/// folder, shown when it exits or does not listen within a minute.
pub fn start(what: &str, mut cmd: Command, args: impl FnOnce(u16) -> Vec<String>) -> u16 {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("taming-{what}-{}-{port}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).expect("a log file in the temp folder");
    cmd.args(args(port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
    // this thread goes away.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            let _ = tx.send(format!("it exited ({status})"));
        }
        Err(e) => {
            let _ = tx.send(format!("{:?}: {e}", cmd.get_program()));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !listening(port) {
        let why = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(why) => why,
            Err(_) if Instant::now() > deadline => "it did not listen within a minute".into(),
            Err(_) => continue,
        };
        panic!(
            "cannot start {what} on port {port}: {why} (scripts/test.sh installs it under \
             ~/.cache/taming-rs); its stderr: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    port
}

/// Whether something accepts connections on the loopback `port` (not counting a TCP
/// self-connection, which a connect from an ephemeral port to itself makes).
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

/// Sets the variables in this process (so that the tests' own clients see them too).
pub fn export(vars: &[(&'static str, String)]) {
    for (k, v) in vars {
        // SAFETY: set once, while the server starts and before any client of this process
        // reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
}
