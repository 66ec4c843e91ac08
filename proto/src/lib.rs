//! The wire formats of taming-rs services, generated from `proto/*.proto` (the
//! [`coordinator`] and [`dataloader`] gRPC services, compiled with protox).
//!
//! This crate computes nothing and does not link burn. Besides the generated messages and
//! tonic clients/servers it holds what every service shares: the cluster token and worker
//! secrets ([`auth`]), TLS settings ([`tls`]), the Prometheus text format ([`metrics`]), and
//! in [`job`] the coordinator's messages as checked Rust types (stage, job and rank states,
//! collective, conditioning, one type per stage's fields), decoded once where they arrive.

pub mod auth;
pub mod job;
pub mod metrics;
pub mod tls;

/// The dataloader service: ready batches streamed to trainers.
pub mod dataloader {
    tonic::include_proto!("taming.dataloader.v1");
}

/// The coordinator: registry, jobs, assignments, progress, rendezvous.
pub mod coordinator {
    tonic::include_proto!("taming.coordinator.v1");
}

/// The kind of a device (`cuda:1` -> `cuda`) or of a job's device field (`cuda`; empty ->
/// `cpu`), as workers offer and jobs ask for them in `Device.spec` and `JobSpec.device`.
pub fn device_kind(device: &str) -> &str {
    match device.split(':').next().unwrap_or_default() {
        "" => "cpu",
        kind => kind,
    }
}

/// Checks a `host:port` address as workers advertise their ring: the host an IPv4 address,
/// a bracketed IPv6 one or a DNS name (as Kubernetes and compose give pods and services),
/// the port 1-65535.
pub fn host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("`{addr}` is not host:port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("`{addr}`: the port `{port}` is not 1-65535"))?;
    let valid = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.len() <= 253 && host.split('.').all(dns_label),
    };
    if !valid {
        return Err(format!(
            "`{addr}`: the host `{host}` is not an IP address or DNS name"
        ));
    }
    Ok((host, port))
}

/// One label of a DNS name: 1-63 letters, digits and inner hyphens.
fn dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A coordinator client that sends the cluster token with every call.
pub type CoordinatorClient = coordinator::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, auth::AttachToken>,
>;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS settings, or plaintext refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The transport failed (no answer, TLS handshake refused).
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// A channel to `addr` (`host:port` or a URL) over `transport` (TLS, or plaintext where
/// allowed), connected within 5 seconds; calls time out after `deadline`, and HTTP/2
/// keepalives probe the connection every 30 seconds.
pub async fn channel(
    addr: &str,
    transport: &tls::Transport,
    deadline: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let tls = transport.client(addr)?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(transport.url(addr))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(d) = deadline {
        endpoint = endpoint.timeout(d);
    }
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

/// How long a unary coordinator call may take.
pub const COORDINATOR_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Who calls the coordinator: the cluster token, and a registered worker's session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The cluster token.
    pub token: Option<&'a str>,
    /// The worker session the coordinator gave at registration.
    pub session: Option<&'a str>,
}

/// Connects to the coordinator at `addr` (`host:port` or a URL) within 5 seconds, for
/// unary calls: each fails after [`COORDINATOR_DEADLINE`].
pub async fn connect_coordinator(
    addr: &str,
    caller: Caller<'_>,
    transport: &tls::Transport,
) -> Result<CoordinatorClient, ConnectError> {
    coordinator_client(addr, caller, transport, Some(COORDINATOR_DEADLINE)).await
}

/// Like [`connect_coordinator`], for the long-lived assignment stream (no deadline; the
/// keepalives notice a dead peer).
pub async fn connect_coordinator_stream(
    addr: &str,
    caller: Caller<'_>,
    transport: &tls::Transport,
) -> Result<CoordinatorClient, ConnectError> {
    coordinator_client(addr, caller, transport, None).await
}

async fn coordinator_client(
    addr: &str,
    caller: Caller<'_>,
    transport: &tls::Transport,
    deadline: Option<std::time::Duration>,
) -> Result<CoordinatorClient, ConnectError> {
    let channel = channel(addr, transport, deadline).await?;
    let attach = auth::AttachToken::new(caller.token).with_session(caller.session);
    Ok(coordinator::coordinator_client::CoordinatorClient::with_interceptor(channel, attach))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn ring_addresses_may_name_hosts_as_clusters_do() {
        for (addr, host, port) in [
            ("worker-0:7000", "worker-0", 7000),
            (
                "w-3.taming-worker.default.svc:7000",
                "w-3.taming-worker.default.svc",
                7000,
            ),
            ("10.0.0.3:7000", "10.0.0.3", 7000),
            ("[::1]:7000", "[::1]", 7000),
            ("localhost:1", "localhost", 1),
        ] {
            assert_eq!(host_port(addr), Ok((host, port)), "{addr}");
        }
    }

    #[test]
    fn malformed_ring_addresses_name_what_is_wrong() {
        for (addr, wrong) in [
            ("not an address", "host:port"),
            ("worker-0", "host:port"),
            ("worker-0:", "port"),
            ("worker-0:0", "port"),
            ("worker-0:70000", "port"),
            (":7000", "host"),
            ("bad host:7000", "host"),
            ("-x.y:7000", "host"),
            ("a..b:7000", "host"),
            ("[::g]:7000", "host"),
        ] {
            let err = host_port(addr).unwrap_err();
            assert!(err.contains(addr) && err.contains(wrong), "{addr}: {err}");
        }
    }
}
