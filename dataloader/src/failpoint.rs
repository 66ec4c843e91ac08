//! The uploads' test failpoint: `TAMING_UPLOAD_FAILPOINT=abort-after-parts:N` aborts the
//! process once N parts of a multipart upload are sent, as a machine that dies mid-upload
//! would. Tests use it to show that no half-written shard or Parquet file becomes visible.
//! Unset (always, outside tests) it does nothing.

/// The environment variable that sets the failpoint.
pub const UPLOAD_FAILPOINT_ENV: &str = "TAMING_UPLOAD_FAILPOINT";

/// Called after each part of a multipart upload: aborts when `sent` parts are what the
/// failpoint names.
pub(crate) fn after_part(sent: usize) {
    let Ok(value) = std::env::var(UPLOAD_FAILPOINT_ENV) else {
        return;
    };
    match value
        .strip_prefix("abort-after-parts:")
        .map(str::parse::<usize>)
    {
        Some(Ok(n)) if n == sent => {
            eprintln!("aborting after {sent} uploaded part(s) ({UPLOAD_FAILPOINT_ENV})");
            std::process::abort();
        }
        Some(Ok(_)) => {}
        _ => tracing::warn!(%value, "{UPLOAD_FAILPOINT_ENV} is not abort-after-parts:N; ignored"),
    }
}
