//! The wire formats of taming-rs services, generated from `proto/*.proto`.
//!
//! This crate computes nothing: it holds messages, tonic clients/servers and the token
//! interceptors every service shares.

pub mod auth;
pub mod metrics;

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

/// `http://` put before a bare `host:port`; URLs pass unchanged.
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A coordinator client that sends the cluster token with every call.
pub type CoordinatorClient = coordinator::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, auth::AttachToken>,
>;

/// Connects to the coordinator at `addr` (`host:port` or a URL) within 5 seconds.
pub async fn connect_coordinator(
    addr: &str,
    token: Option<&str>,
) -> Result<CoordinatorClient, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint_url(addr))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await?;
    Ok(
        coordinator::coordinator_client::CoordinatorClient::with_interceptor(
            channel,
            auth::AttachToken::new(token),
        ),
    )
}
