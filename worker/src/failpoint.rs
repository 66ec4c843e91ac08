//! Faults injected on purpose, for testing recovery through the real binaries:
//! `TAMING_FAILPOINT=panic-at-step:N` makes a cluster worker panic when it reports step N
//! (every attempt that reaches step N panics again, as a deterministic bug would);
//! `hang-at-step:N` makes it stop there for good while its heartbeat goes on (a hung rank);
//! `nan-at-steps:A-B` makes stage-1 training inputs not-a-number in steps A to B (every time
//! they are trained, as a diverging run would); `hold-at-step:N` stops it at step N until the
//! file named by `TAMING_FAILPOINT_RELEASE` exists (a job held running while a test looks);
//! `abort-in-upload:N` aborts the process while it copies the checkpoint of step N to object
//! storage, its files sent and `checkpoints/latest` not yet (a process killed mid-upload).

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that sets the failpoint.
pub const FAILPOINT_ENV: &str = "TAMING_FAILPOINT";
/// The file whose existence releases a `hold-at-step` failpoint.
pub const RELEASE_ENV: &str = "TAMING_FAILPOINT_RELEASE";

/// A configured fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Panic when step N is reported.
    PanicAtStep(u64),
    /// Stop (sleep forever) when step N is reported.
    HangAtStep(u64),
    /// Stop when step N is reported until the file named by [`RELEASE_ENV`] exists.
    HoldAtStep(u64),
    /// Training inputs of steps A..=B are NaN.
    NanAtSteps(u64, u64),
    /// Abort while uploading the checkpoint of step N, before naming it.
    AbortInUpload(u64),
}

/// The failpoint set by [`FAILPOINT_ENV`], if any; an error naming the variable when its
/// value is not `panic-at-step:N` or `hang-at-step:N`.
pub fn configured() -> Result<Option<Failpoint>, String> {
    static POINT: OnceLock<Result<Option<Failpoint>, String>> = OnceLock::new();
    POINT
        .get_or_init(|| match std::env::var(FAILPOINT_ENV) {
            Err(_) => Ok(None),
            Ok(v) => parse(&v).map(Some).ok_or_else(|| {
                format!(
                    "{FAILPOINT_ENV}=`{v}`: expected panic-at-step:N, hang-at-step:N, \
                     hold-at-step:N, abort-in-upload:N or nan-at-steps:A-B"
                )
            }),
        })
        .clone()
}

fn parse(v: &str) -> Option<Failpoint> {
    let (kind, step) = v.split_once(':')?;
    if kind == "nan-at-steps" {
        let (a, b) = step.split_once('-')?;
        return Some(Failpoint::NanAtSteps(a.parse().ok()?, b.parse().ok()?));
    }
    let step = step.parse().ok()?;
    match kind {
        "panic-at-step" => Some(Failpoint::PanicAtStep(step)),
        "hang-at-step" => Some(Failpoint::HangAtStep(step)),
        "hold-at-step" => Some(Failpoint::HoldAtStep(step)),
        "abort-in-upload" => Some(Failpoint::AbortInUpload(step)),
        _ => None,
    }
}

/// Panics or hangs when the failpoint names `step`.
pub fn at_step(step: u64) {
    match configured() {
        Ok(Some(Failpoint::PanicAtStep(n))) if n == step => {
            panic!("injected failure at step {step} ({FAILPOINT_ENV})")
        }
        Ok(Some(Failpoint::HangAtStep(n))) if n == step => {
            tracing::warn!("{FAILPOINT_ENV}: hanging at step {step}");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Ok(Some(Failpoint::HoldAtStep(n))) if n == step => {
            let release = std::env::var_os(RELEASE_ENV).unwrap_or_default();
            tracing::warn!(?release, "{FAILPOINT_ENV}: held at step {step}");
            while !std::path::Path::new(&release).exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        _ => {}
    }
}

/// Aborts the process when the failpoint names the checkpoint of `step`, being uploaded.
pub fn in_upload(step: u64) {
    if matches!(configured(), Ok(Some(Failpoint::AbortInUpload(n))) if n == step) {
        tracing::warn!("{FAILPOINT_ENV}: aborting in the upload of step {step}'s checkpoint");
        std::process::abort();
    }
}

/// Whether the failpoint makes the inputs of training step `step` NaN.
pub fn nan_at(step: u64) -> bool {
    matches!(configured(), Ok(Some(Failpoint::NanAtSteps(a, b))) if (a..=b).contains(&step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_parse_or_are_refused() {
        assert_eq!(parse("panic-at-step:3"), Some(Failpoint::PanicAtStep(3)));
        assert_eq!(parse("hang-at-step:12"), Some(Failpoint::HangAtStep(12)));
        assert_eq!(parse("hold-at-step:2"), Some(Failpoint::HoldAtStep(2)));
        assert_eq!(
            parse("abort-in-upload:4"),
            Some(Failpoint::AbortInUpload(4))
        );
        assert_eq!(parse("nan-at-steps:4-6"), Some(Failpoint::NanAtSteps(4, 6)));
        for bad in [
            "panic-at-step",
            "panic-at-step:x",
            "explode-at-step:3",
            "nan-at-steps:4",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
