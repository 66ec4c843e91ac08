//! The taming-rs coordinator: a worker registry, a job queue and the assignment of jobs to
//! groups of workers ([`cluster`]), served over gRPC ([`service`]: the cluster token, worker
//! secrets, mutual TLS with certificates from [`certs`]), the status page and Prometheus
//! metrics over HTTP ([`http`]), the client side of `launch|status|cancel` ([`client`]), the
//! local mini-cluster that `launch` starts without `--coordinator` ([`standalone`]), and the
//! `coordinator` command line over all of them ([`cli`]). Computes nothing and does not link
//! burn.

pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod http;
pub mod service;
pub mod standalone;
