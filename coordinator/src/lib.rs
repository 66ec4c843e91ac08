//! The taming-rs coordinator: a worker registry, a job queue and the assignment of jobs to
//! groups of workers ([`cluster`]), served over gRPC ([`service`], with token
//! authentication and mutual TLS, certificates from [`certs`]), the status page and Prometheus metrics over HTTP ([`http`]), and the
//! client side used by `coordinator launch|status|cancel` ([`client`]), and the local
//! mini-cluster that `launch` starts without `--coordinator` ([`standalone`]). Computes
//! nothing and does not link burn.

pub mod certs;
pub mod client;
pub mod cluster;
pub mod http;
pub mod service;
pub mod standalone;
