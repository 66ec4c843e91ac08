//! `worker --coordinator ADDR --nproc-per-node N`: one worker process per local device, as
//! torchrun starts one process per GPU. The parent starts N copies of its own binary, each
//! registering as `NAME-i` with its own device (`cuda:i`, or the i-th after `--device`), ring
//! and metrics ports (the given ports plus i) and share of the CPU threads, and supervises
//! them: when one exits the others are stopped and the parent exits, naming the local rank
//! and its status; each child is stopped (SIGTERM) when the parent dies. The token and TLS
//! files reach the children through the environment.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use taming_model::device::DeviceSpec;

/// What a node's local ranks are made from.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Local ranks (processes).
    pub nproc: usize,
    /// The node's name; local rank i registers as `NAME-i`.
    pub name: String,
    /// The first local rank's device; the others take the next ordinals.
    pub device: Option<DeviceSpec>,
    /// The first local rank's ring address (port 0: each picks its own).
    pub ring_bind: SocketAddr,
    /// The first local rank's advertised ring address.
    pub advertise: Option<String>,
    /// The first local rank's metrics address.
    pub metrics: Option<SocketAddr>,
    /// Compute threads per local rank (default: the cores shared out).
    pub threads: Option<usize>,
    /// Arguments every local rank gets (coordinator, prefetch, timeouts, logging).
    pub common_args: Vec<OsString>,
}

/// One local rank's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRank {
    /// Name in the coordinator's registry.
    pub name: String,
    /// `--device` (none: the CPU).
    pub device: Option<DeviceSpec>,
    /// `--ring-bind`.
    pub ring_bind: SocketAddr,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--threads`.
    pub threads: usize,
}

/// The local ranks of a node with `cores` CPU cores and `cuda` CUDA devices.
pub fn plan(o: &NodeOptions, cores: usize, cuda: usize) -> Result<Vec<LocalRank>> {
    if o.nproc == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    (0..o.nproc)
        .map(|i| {
            Ok(LocalRank {
                name: format!("{}-{i}", o.name),
                device: device(o.device.as_ref(), i, o.nproc, cuda)?,
                ring_bind: shifted(o.ring_bind, i, "--ring-bind")?,
                advertise: o
                    .advertise
                    .as_deref()
                    .map(|a| shifted_host_port(a, i))
                    .transpose()?,
                metrics: o.metrics.map(|m| shifted(m, i, "--metrics")).transpose()?,
                threads: o.threads.unwrap_or((cores / o.nproc).max(1)),
            })
        })
        .collect()
}

/// Local rank `i`'s device: the given one's kind at its ordinal plus `i`; without one,
/// `cuda:i` when the node has a CUDA device per local rank, else the CPU.
fn device(
    first: Option<&DeviceSpec>,
    i: usize,
    nproc: usize,
    cuda: usize,
) -> Result<Option<DeviceSpec>> {
    Ok(match first {
        Some(DeviceSpec::Cpu) => Some(DeviceSpec::Cpu),
        Some(DeviceSpec::Cuda(n)) => Some(DeviceSpec::Cuda(n + i)),
        Some(DeviceSpec::Vulkan(n)) => Some(DeviceSpec::Vulkan(n + i)),
        Some(DeviceSpec::Wgpu(n)) => Some(DeviceSpec::Wgpu(n + i)),
        None if cuda >= nproc => Some(DeviceSpec::Cuda(i)),
        None if cuda > 0 => bail!(
            "--nproc-per-node {nproc} but this node has {cuda} CUDA device(s): give at most \
             {cuda}, or --device cpu"
        ),
        None => None,
    })
}

/// `addr` with its port plus `i` (port 0 stays 0: each process binds its own).
fn shifted(addr: SocketAddr, i: usize, flag: &str) -> Result<SocketAddr> {
    if addr.port() == 0 {
        return Ok(addr);
    }
    let port = u16::try_from(addr.port() as usize + i)
        .ok()
        .with_context(|| {
            format!(
                "{flag} {addr}: port {} + local rank {i} is over 65535",
                addr.port()
            )
        })?;
    Ok(SocketAddr::new(addr.ip(), port))
}

/// `host:port` with the port plus `i`.
fn shifted_host_port(addr: &str, i: usize) -> Result<String> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("--advertise {addr}: not host:port"))?;
    let port: usize = port
        .parse()
        .with_context(|| format!("--advertise {addr}: not host:port"))?;
    let port = u16::try_from(port + i)
        .ok()
        .with_context(|| format!("--advertise {addr}: port + local rank {i} is over 65535"))?;
    Ok(format!("{host}:{port}"))
}

/// Starts the node's local ranks and supervises them until one exits (then the others are
/// stopped): an error naming the local rank unless it exited successfully.
pub fn run_node(o: NodeOptions) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ranks = plan(&o, cores, crate::devices::cuda_devices().len())?;
    let exe = std::env::current_exe().context("finding the worker binary")?;
    let mut children = Vec::new();
    for (i, rank) in ranks.iter().enumerate() {
        let child = command(&exe, &o.common_args, rank)
            .spawn()
            .with_context(|| format!("starting local rank {i} ({})", rank.name))?;
        println!(
            "local rank {i}: {} (pid {}) on {}",
            rank.name,
            child.id(),
            rank.device.map_or("cpu".into(), |d| d.to_string())
        );
        children.push(child);
    }
    let (i, status) = first_exit(&mut children)?;
    stop_all(&mut children);
    let name = &ranks[i].name;
    if status.success() {
        println!("local rank {i} ({name}) exited; the other local ranks were stopped");
        return Ok(());
    }
    bail!("local rank {i} ({name}) exited with {status}; the other local ranks were stopped")
}

/// The worker command of one local rank; it dies with its parent.
fn command(exe: &std::path::Path, common: &[OsString], rank: &LocalRank) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(common)
        .args(["--name", &rank.name])
        .args(["--ring-bind", &rank.ring_bind.to_string()])
        .args(["--threads", &rank.threads.to_string()]);
    if let Some(a) = &rank.advertise {
        cmd.args(["--advertise", a]);
    }
    if let Some(m) = rank.metrics {
        cmd.args(["--metrics", &m.to_string()]);
    }
    if let Some(d) = &rank.device {
        cmd.args(["--device", &d.to_string()]);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Waits until a child exits: its index and status.
fn first_exit(children: &mut [Child]) -> Result<(usize, ExitStatus)> {
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().context("waiting for a local rank")? {
                return Ok((i, status));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM to every child still running, SIGKILL to those left after 10 seconds.
fn stop_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of a child not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(nproc: usize) -> NodeOptions {
        NodeOptions {
            nproc,
            name: "node".into(),
            device: None,
            ring_bind: "0.0.0.0:7000".parse().unwrap(),
            advertise: Some("node.cluster.local:7000".into()),
            metrics: Some("0.0.0.0:9200".parse().unwrap()),
            threads: None,
            common_args: Vec::new(),
        }
    }

    #[test]
    fn local_ranks_take_the_next_device_ports_and_a_share_of_the_cores() {
        let ranks = plan(&opts(4), 16, 4).unwrap();
        let names: Vec<_> = ranks.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["node-0", "node-1", "node-2", "node-3"]);
        let devices: Vec<_> = ranks.iter().map(|r| r.device).collect();
        assert_eq!(
            devices,
            (0..4)
                .map(|i| Some(DeviceSpec::Cuda(i)))
                .collect::<Vec<_>>()
        );
        assert_eq!(ranks[3].ring_bind, "0.0.0.0:7003".parse().unwrap());
        assert_eq!(
            ranks[3].advertise.as_deref(),
            Some("node.cluster.local:7003")
        );
        assert_eq!(ranks[3].metrics, Some("0.0.0.0:9203".parse().unwrap()));
        assert!(ranks.iter().all(|r| r.threads == 4));

        let mut o = opts(2);
        o.device = Some(DeviceSpec::Vulkan(1));
        o.ring_bind = "127.0.0.1:0".parse().unwrap();
        o.threads = Some(3);
        let ranks = plan(&o, 2, 0).unwrap();
        assert_eq!(ranks[1].device, Some(DeviceSpec::Vulkan(2)));
        assert_eq!(ranks[1].ring_bind.port(), 0, "port 0: each binds its own");
        assert_eq!(ranks[1].threads, 3);
        assert_eq!(
            plan(&opts(2), 2, 0).unwrap()[1].device,
            None,
            "no GPU: the CPU"
        );
    }

    #[test]
    fn impossible_nodes_are_refused_naming_the_flag() {
        let err = plan(&opts(4), 16, 2).unwrap_err().to_string();
        assert!(
            err.contains("--nproc-per-node 4 but this node has 2 CUDA"),
            "{err}"
        );
        assert!(plan(&opts(0), 16, 0).is_err());
        let mut o = opts(2);
        o.ring_bind = "0.0.0.0:65535".parse().unwrap();
        let err = plan(&o, 2, 0).unwrap_err().to_string();
        assert!(err.contains("--ring-bind"), "{err}");
    }
}
