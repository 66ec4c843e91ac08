//! The local mini-cluster of `coordinator launch` without `--coordinator`: a coordinator in
//! this process, dataloader services and one `worker` process per node on loopback, talking
//! mutual TLS with certificates made for the launch (`OUT/.coordinator/tls/`), with a
//! supervisor that, like torchrun's, restarts a worker process that exits (the job then
//! resumes from its checkpoint) and tells the coordinator at once how it ended (exit status
//! or signal, and the last lines of its log).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use taming_proto::auth::TOKEN_ENV;
use taming_proto::job::{Job, JobSpec};
use taming_proto::tls::{TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, Transport};

use crate::client;
use crate::cluster::DEFAULT_MAX_RESTARTS;
use crate::service::{CoordinatorService, DEFAULT_PROGRESS_TIMEOUT_S, ServeOptions, serve};

/// Settings of the local mini-cluster.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// Dataloader services to start (0: the workers read the shards).
    pub dataloaders: usize,
    /// Draw the progress bar.
    pub show: bool,
    /// Local ranks per worker process (`worker --nproc-per-node`); the job's ranks are
    /// shared out over `nodes / nproc_per_node` workers.
    pub nproc_per_node: u32,
}

/// Runs `spec` on a mini-cluster started for it and returns the job's final state. Logs go
/// to `OUT/logs/`, the coordinator's state to `OUT/.coordinator/`.
pub async fn launch_local(mut spec: JobSpec, opts: StandaloneOptions) -> Result<Job> {
    let out = PathBuf::from(&spec.out);
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let token = random_token()?;
    let tls = LocalTls::make(&out.join(".coordinator/tls"))?;
    let service = CoordinatorService::new(ServeOptions {
        state_dir: out.join(".coordinator"),
        heartbeat_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        token: Some(token.clone()),
        progress_timeout: Duration::from_secs(DEFAULT_PROGRESS_TIMEOUT_S),
        report_save_interval: crate::service::REPORT_SAVE_INTERVAL,
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bound = listener.local_addr()?;
    let addr = bound.to_string();
    let server_tls = tls.transport.server(bound, "the coordinator")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(service.clone(), listener, server_tls, async {
        let _ = stop_rx.await;
    }));
    let mut dataloaders = Children(Vec::new());
    let roots = data_roots(&spec.data);
    for i in 0..opts.dataloaders {
        match start_dataloader(&logs, i, &token, &tls, &roots) {
            Ok((child, dl)) => {
                dataloaders.0.push(child);
                spec.dataloaders.push(dl);
            }
            Err(e) => {
                eprintln!("note: no dataloader service ({e:#}); workers read the shards");
                break;
            }
        }
    }
    let respawns = spec.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS) + 1;
    // Local workers find CUDA devices themselves; a Vulkan or wgpu device (the one adapter
    // every local worker shares) is given to them.
    let device = match spec.device.kind() {
        "vulkan" | "wgpu" if spec.device.as_str().contains(':') => Some(spec.device.to_string()),
        kind @ ("vulkan" | "wgpu") => Some(format!("{kind}:0")),
        _ => None,
    };
    let nproc = opts.nproc_per_node.max(1);
    let workers = (0..spec.nodes.div_ceil(nproc))
        .map(|i| {
            let node = LocalNode {
                device: device.clone(),
                nproc,
            };
            LocalWorker::start(i, &addr, &token, &tls, &logs, node)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut c = client::connect(&addr, Some(&token), &tls.transport).await?;
    let id = client::submit(&mut c, &spec).await?;
    let job = tokio::select! {
        job = client::follow(&mut c, &id, opts.show) => job,
        () = supervise(&service, &id, workers, respawns) => unreachable!("supervision ends with the job"),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; {id} stopped with its workers (continue with --resume)")),
    };
    drop(dataloaders);
    let _ = stop_tx.send(());
    let _ = server.await;
    job
}

/// What a local worker process runs on: `--device` (a Vulkan or wgpu adapter) and its local
/// ranks (`--nproc-per-node`).
#[derive(Clone)]
struct LocalNode {
    device: Option<String>,
    nproc: u32,
}

/// Children killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The mini-cluster's certificates: a CA and one `localhost` pair (also valid for
/// 127.0.0.1) that every process uses as server and client identity.
struct LocalTls {
    files: [(&'static str, PathBuf); 3],
    transport: Transport,
}

impl LocalTls {
    /// Makes fresh certificates in `dir` (replacing those of an earlier launch).
    fn make(dir: &Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        crate::certs::write_certs(dir, &["localhost".into()], 30)?;
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("localhost.pem"),
            dir.join("localhost.key"),
        );
        let transport = Transport::from_files(&ca, &cert, &key)?;
        Ok(Self {
            files: [(TLS_CA_ENV, ca), (TLS_CERT_ENV, cert), (TLS_KEY_ENV, key)],
            transport,
        })
    }

    /// The environment that gives a child process these certificates.
    fn env(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        self.files.iter().map(|(k, v)| (*k, v.as_path()))
    }
}

/// One `worker` process of the mini-cluster, named `local-N`, logging to `worker-N.log`.
struct LocalWorker {
    name: String,
    coordinator: String,
    token: String,
    tls: Vec<(&'static str, PathBuf)>,
    log: PathBuf,
    /// Its device and local ranks.
    node: LocalNode,
    child: Children,
    exits: u32,
}

impl LocalWorker {
    fn start(
        i: u32,
        coordinator: &str,
        token: &str,
        tls: &LocalTls,
        logs: &Path,
        node: LocalNode,
    ) -> Result<Self> {
        let mut w = Self {
            node,
            name: format!("local-{i}"),
            coordinator: coordinator.to_string(),
            token: token.to_string(),
            tls: tls.env().map(|(k, v)| (k, v.to_path_buf())).collect(),
            log: logs.join(format!("worker-{i}.log")),
            child: Children(Vec::new()),
            exits: 0,
        };
        std::fs::File::create(&w.log).with_context(|| format!("creating {}", w.log.display()))?;
        w.spawn()?;
        Ok(w)
    }

    /// Starts the process, appending to its log.
    fn spawn(&mut self) -> Result<()> {
        let worker = sibling("worker")?;
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut cmd = Command::new(&worker);
        cmd.args(["--coordinator", &self.coordinator, "--name", &self.name]);
        if let Some(d) = &self.node.device {
            cmd.args(["--device", d]);
        }
        if self.node.nproc > 1 {
            cmd.args(["--nproc-per-node", &self.node.nproc.to_string()]);
        }
        let child = cmd
            .env(TOKEN_ENV, &self.token)
            .envs(self.tls.iter().map(|(k, v)| (*k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", worker.display()))?;
        self.child.0 = vec![child];
        Ok(())
    }

    /// How the process ended, if it has: its pid and exit status or signal, and the last
    /// lines of its log.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.0.first_mut()?;
        let status = child.try_wait().ok()??;
        let pid = child.id();
        self.child.0.clear();
        self.exits += 1;
        let tail = log_tail(&self.log, 3);
        Some(format!(
            "worker {} (pid {pid}) {}{}",
            self.name,
            describe(status),
            if tail.is_empty() {
                String::new()
            } else {
                format!("; its log ends: {tail}")
            }
        ))
    }
}

/// Watches the workers until the job ends: a worker that exits is reported to the
/// coordinator (failing its attempt at once) and started again, at most `respawns` times;
/// past that the job fails with the last exit. Never returns by itself: dropping it kills
/// the workers.
async fn supervise(
    service: &CoordinatorService,
    id: &str,
    mut workers: Vec<LocalWorker>,
    respawns: u32,
) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        for w in &mut workers {
            let Some(why) = w.exited() else {
                continue;
            };
            tracing::warn!("{why}");
            service.worker_exited(&w.name, &why);
            if service.job_ended(id) {
                continue;
            }
            if w.exits > respawns {
                service.fail_job(id, &format!("{why} ({} exits; not restarted)", w.exits));
            } else if let Err(e) = w.spawn() {
                service.fail_job(id, &format!("{why}; restarting it failed: {e:#}"));
            }
        }
    }
}

/// `exited with status N` or `was killed by signal N (NAME)`.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                7 => " (SIGBUS)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        (None, None) => format!("ended ({status})"),
    }
}

/// The last `n` non-empty lines of a log (read from its last 16 KiB, colours removed),
/// joined with ` | ` and cut to 1,500 bytes.
fn log_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = strip_ansi(&String::from_utf8_lossy(&bytes));
    }
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.len() > 1500 {
        let mut cut = tail.len() - 1500;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = format!("...{}", &tail[cut..]);
    }
    tail
}

/// Text without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// 128 random bits, hex, for the mini-cluster's token.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Local directories the mini-cluster's dataloaders may read: the job's data folder, or
/// (with no --data) the embedded data where a worker finds it (under the current directory
/// or the checkout this was built from).
fn data_roots(data: &str) -> Vec<PathBuf> {
    if data.contains("://") && !data.starts_with("file://") {
        return Vec::new();
    }
    if !data.is_empty() {
        let path = PathBuf::from(data.trim_start_matches("file://"));
        return vec![if path.is_dir() {
            path
        } else {
            path.parent().map(Path::to_path_buf).unwrap_or(path)
        }];
    }
    [
        PathBuf::from("data"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data"),
    ]
    .into_iter()
    .filter(|p| p.is_dir())
    .collect()
}

/// Starts `dataloader serve` on a free loopback port, over TLS, reading shards below
/// `roots`; returns it and its address.
fn start_dataloader(
    logs: &Path,
    i: usize,
    token: &str,
    tls: &LocalTls,
    roots: &[PathBuf],
) -> Result<(Child, String)> {
    let bin = sibling("dataloader")?;
    let log = std::fs::File::create(logs.join(format!("dataloader-{i}.log")))?;
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--bind", "127.0.0.1:0"]);
    for root in roots {
        cmd.arg("--data-root").arg(root);
    }
    let mut child = cmd
        .env(TOKEN_ENV, token)
        .envs(tls.env())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("the dataloader did not start")?;
    Ok((child, addr.to_string()))
}

/// A binary beside this one (or named by `$TAMING_<NAME>_BIN`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(format!("TAMING_{}_BIN", name.to_uppercase())) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating this executable")?;
    let bin = me.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} not found: build the workspace (same profile), or set TAMING_{}_BIN",
            bin.display(),
            name.to_uppercase()
        );
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_is_its_last_lines_without_colours() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("w.log");
        std::fs::write(
            &log,
            "one\n\n\u{1b}[2mtwo\u{1b}[0m\nthread 'main' panicked at x.rs:1:2:\nboom\n\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&log, 3),
            "two | thread 'main' panicked at x.rs:1:2: | boom"
        );
        assert_eq!(log_tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn exit_statuses_read_as_a_person_says_them() {
        assert_eq!(
            describe(ExitStatus::from_raw(101 << 8)),
            "exited with status 101"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
