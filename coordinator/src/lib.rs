//! The taming-rs coordinator: a worker registry, a job queue and the assignment of jobs to
//! groups of workers ([`cluster`]), served over gRPC ([`service`], with token
//! authentication), the status page and Prometheus metrics over HTTP ([`http`]), and the
//! client side used by `coordinator launch|status|cancel` ([`client`]). Computes nothing and
//! does not link burn.

pub mod client;
pub mod cluster;
pub mod http;
pub mod service;
