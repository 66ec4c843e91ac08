//! The wire formats of taming-rs services, generated from `proto/*.proto`.
//!
//! This crate computes nothing: it holds messages, tonic clients/servers and the token
//! interceptors every service shares.

pub mod auth;

/// The dataloader service: ready batches streamed to trainers.
pub mod dataloader {
    tonic::include_proto!("taming.dataloader.v1");
}

/// The coordinator: registry, jobs, assignments, progress, rendezvous.
pub mod coordinator {
    tonic::include_proto!("taming.coordinator.v1");
}
