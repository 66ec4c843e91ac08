//! Support for process-level tests: a real S3 server (moto), the workspace's binaries,
//! killed-on-drop child processes and polling with a deadline. The integration tests of the
//! whole system live in this package's `tests/`; the crates' own tests use this support too.

pub mod http;
pub mod process;
pub mod s3;
