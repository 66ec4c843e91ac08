//! Raw HTTP/1.1 requests for the services' status pages and `/metrics`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Status code and body of a raw request (`raw` is the whole request text).
pub fn request(addr: &str, raw: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    s.write_all(raw.as_bytes()).expect("sending the request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Vec::new(), |i| out[i + 4..].to_vec());
    (code, body)
}

/// Status code and body (as text) of `GET path`.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (code, body) = request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    );
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the unlabelled Prometheus sample `name` at `http://addr/metrics`.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, text) = get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
