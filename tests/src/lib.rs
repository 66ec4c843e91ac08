//! Support for process-level tests: real storage servers (moto for S3, Azurite for Azure
//! Blob), the workspace's binaries, killed-on-drop child processes and polling with a
//! deadline. The integration tests of the whole system live in this package's
//! `tests/`; the crates' own tests use this support too.

pub mod azure;
pub mod http;
pub mod process;
pub mod python;
pub mod s3;
pub mod server;
