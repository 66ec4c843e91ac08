//! A real S3 server for the tests: moto's server mode, started once per test binary on a free
//! loopback port (killed with the test process), with a bucket and the standard AWS
//! environment variables pointing at it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::free_port;

/// The bucket every test uses.
pub const BUCKET: &str = "taming";

/// The moto server's endpoint (`http://127.0.0.1:PORT`).
pub fn s3() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(start_moto)
}

/// The AWS variables children need.
pub fn aws_env() -> Vec<(&'static str, String)> {
    aws_env_for(s3())
}

fn moto_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MOTO_SERVER") {
        return p.into();
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/taming-rs/pyenv/bin/moto_server");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("moto_server")
}

fn start_moto() -> String {
    let port = free_port();
    let (tx, rx) = std::sync::mpsc::channel();
    // moto dies with the thread that started it (PR_SET_PDEATHSIG), so that thread lives
    // as long as the test process.
    std::thread::spawn(move || {
        let mut child = spawn_moto(port);
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    rx.recv().expect("moto started");
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_ready(port);
    http(port, "PUT", &format!("/{BUCKET}"), &[]);
    for (k, v) in aws_env_for(&endpoint) {
        // SAFETY: set once, before any S3 client of this process reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    endpoint
}

fn aws_env_for(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

fn spawn_moto(port: u16) -> Child {
    let mut cmd = Command::new(moto_binary());
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
    // this thread goes away.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start moto_server ({e}); scripts/test.sh installs it into \
             ~/.cache/taming-rs/pyenv, or set MOTO_SERVER"
        )
    })
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto_server did not start on port {port}");
}

/// A bare HTTP request (moto accepts unsigned bucket creation and uploads).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "{method} {path}: {out}"
    );
    out
}

/// Uploads `data` as `s3://taming/<key>`.
pub fn put(key: &str, data: &[u8]) {
    let port = s3().rsplit(':').next().unwrap().parse().unwrap();
    http(port, "PUT", &format!("/{BUCKET}/{key}"), data);
}

/// Uploads every file of `dir` under `prefix` (idempotent).
pub fn upload_dir(dir: &std::path::Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            put(&format!("{prefix}/{name}"), &std::fs::read(&path).unwrap());
        }
    }
}

/// `s3://taming/<path>`.
pub fn url(path: &str) -> String {
    format!("s3://{BUCKET}/{path}")
}
