//! A real S3 server for the tests: moto's server mode, started once per test binary on a free
//! loopback port (killed with the test process), with a bucket and the standard AWS
//! environment variables pointing at it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::OnceLock;

use crate::server;

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

fn start_moto() -> String {
    let moto = server::program("MOTO_SERVER", "pyenv/bin/moto_server", "moto_server");
    let port = server::start("moto_server", Command::new(moto), |port| {
        vec![
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    http(port, "PUT", &format!("/{BUCKET}"), &[]);
    server::export(&aws_env_for(&endpoint));
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
