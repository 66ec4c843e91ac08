//! The process-wide tokio runtime that does this crate's object-store I/O, so that
//! synchronous callers (the reader, the trainers) can stream from object storage.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

/// The I/O runtime (two worker threads; started on first use).
pub fn io() -> Handle {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("taming-io")
            .enable_all()
            .build()
            .expect("starting the I/O runtime")
    })
    .handle()
    .clone()
}

/// Runs `fut` to completion from synchronous code, also when called from inside a runtime.
pub fn block_on<F: std::future::Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    match Handle::try_current() {
        Ok(_) => std::thread::scope(|s| {
            s.spawn(|| io().block_on(fut))
                .join()
                .expect("I/O thread panicked")
        }),
        Err(_) => io().block_on(fut),
    }
}
