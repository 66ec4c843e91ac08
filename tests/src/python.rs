//! The Python that scripts/test.sh prepares (the cached virtualenv, with moto and the PyPI
//! `webdataset` package): interoperability tests run the Python WebDataset against shards
//! taming-rs wrote, and the other way round.

use std::process::Command;

/// `$TAMING_PYTHON`, else the cached virtualenv's python, else `python3` from PATH.
pub fn python() -> Command {
    Command::new(crate::server::program(
        "TAMING_PYTHON",
        "pyenv/bin/python",
        "python3",
    ))
}

/// Runs `script` with `args` and returns its stdout; fails the test with its stderr (a
/// missing `webdataset` package says to run scripts/test.sh, which installs it).
pub fn run(script: &str, args: &[String]) -> String {
    let out = python()
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python: {e} (scripts/test.sh prepares it)"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python failed ({}): {err}\n(scripts/test.sh installs webdataset into its virtualenv, \
         ~/.cache/taming-rs/pyenv or $TAMING_PYENV, and sets TAMING_PYTHON)",
        out.status
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
