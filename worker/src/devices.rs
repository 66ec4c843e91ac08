//! What this machine offers the coordinator, and which device a rank uses: the host (`cpu`
//! with its memory), every CUDA device with its memory when the CUDA driver library loads
//! (cudarc loads it at run time, so this builds and runs without CUDA), and the device given
//! with `--device` (how a Vulkan GPU is offered).

use anyhow::{Result, bail};
use taming_model::device::DeviceSpec;
use taming_proto::device_kind;

/// A device and its memory in bytes (0: unknown).
pub type Offered = (String, u64);

/// The devices to register: `cpu`, then the device given with `--device` alone (a local
/// rank of `--nproc-per-node` offers only its own), else every CUDA device.
pub fn detect(configured: Option<&DeviceSpec>) -> Vec<Offered> {
    offer(configured, host_memory(), cuda_devices())
}

/// [`detect`] over what was found: the host's memory and the CUDA devices listed.
fn offer(configured: Option<&DeviceSpec>, host: u64, cuda: Vec<Offered>) -> Vec<Offered> {
    let mut devices = vec![("cpu".to_string(), host)];
    match configured {
        None => devices.extend(cuda),
        Some(DeviceSpec::Cpu) => {}
        Some(d) => {
            let spec = d.to_string();
            let memory = cuda.iter().find(|(s, _)| *s == spec).map_or(0, |(_, m)| *m);
            devices.push((spec, memory));
        }
    }
    devices
}

/// Total host memory (`MemTotal` of /proc/meminfo), 0 where unknown.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total(&text))
        .unwrap_or(0)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `cuda:N` with its total memory for every CUDA device; none when the driver is absent.
pub fn cuda_devices() -> Vec<Offered> {
    use cudarc::driver::result;
    // SAFETY: only checks whether the library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Vec::new();
    }
    let listed = (|| -> Result<Vec<Offered>, result::DriverError> {
        result::init()?;
        (0..result::device::get_count()?)
            .map(|i| {
                let dev = result::device::get(i)?;
                // SAFETY: `dev` is a valid device handle from the driver.
                let bytes = unsafe { result::device::total_mem(dev)? };
                Ok((format!("cuda:{i}"), bytes as u64))
            })
            .collect()
    })();
    listed.unwrap_or_else(|e| {
        tracing::warn!("the CUDA driver loads but lists no device: {e:?}");
        Vec::new()
    })
}

/// The device rank `rank` uses for a job asking for `job_device`: `configured` when it is of
/// that kind, else the offered devices of that kind in turn (rank mod their count).
pub fn choose(
    job_device: &str,
    rank: u32,
    configured: Option<&DeviceSpec>,
    offered: &[Offered],
) -> Result<DeviceSpec> {
    let kind = device_kind(job_device);
    if let Some(d) = configured
        && device_kind(&d.to_string()) == kind
    {
        return Ok(*d);
    }
    if job_device.contains(':') || kind == "cpu" {
        return job_device_spec(job_device);
    }
    let of_kind: Vec<&str> = offered
        .iter()
        .map(|(s, _)| s.as_str())
        .filter(|s| device_kind(s) == kind)
        .collect();
    if of_kind.is_empty() {
        bail!("the job asks for a {kind} device and this worker has none (it offers {offered:?})");
    }
    job_device_spec(of_kind[rank as usize % of_kind.len()])
}

/// The CUDA device ordinal NCCL runs a rank on: that of the device it was given (never its
/// rank number); other devices cannot join an NCCL group.
pub fn nccl_ordinal(device: &DeviceSpec, rank: u32) -> Result<usize> {
    match device {
        DeviceSpec::Cuda(n) => Ok(*n),
        other => bail!("collective nccl needs a CUDA device; rank {rank} was given {other}"),
    }
}

fn job_device_spec(text: &str) -> Result<DeviceSpec> {
    let text = if text.is_empty() { "cpu" } else { text };
    text.parse()
        .map_err(|e: String| anyhow::anyhow!("device `{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_read_from_meminfo() {
        let text = "MemTotal:       24567890 kB\nMemFree:  100 kB\n";
        assert_eq!(parse_mem_total(text), Some(24567890 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(host_memory() > 0);
        }
        assert!(detect(None)[0].1 > 0 || !std::path::Path::new("/proc/meminfo").exists());
    }

    /// The GPU overlay gives each pod one GPU: every rank runs on cuda:0, and NCCL must use
    /// that device, not the rank number (rank 1 on ordinal 1 failed in every pod).
    #[test]
    fn nccl_runs_each_rank_on_the_device_it_was_given() {
        let one_gpu = vec![("cpu".to_string(), 1), ("cuda:0".to_string(), 1)];
        for rank in 0..4 {
            let device = choose("cuda", rank, None, &one_gpu).unwrap();
            assert_eq!(nccl_ordinal(&device, rank).unwrap(), 0, "rank {rank}");
        }
        let two = vec![("cuda:0".to_string(), 1), ("cuda:1".to_string(), 1)];
        let device = choose("cuda", 3, None, &two).unwrap();
        assert_eq!(nccl_ordinal(&device, 3).unwrap(), 1);
        let e = nccl_ordinal(&DeviceSpec::Cpu, 2).unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("CUDA"), "{e}");
    }

    #[test]
    fn ranks_take_the_offered_devices_of_the_job_kind_in_turn() {
        let offered = vec![
            ("cpu".to_string(), 1),
            ("cuda:0".to_string(), 1),
            ("cuda:1".to_string(), 1),
        ];
        let pick = |dev: &str, rank| choose(dev, rank, None, &offered).unwrap().to_string();
        assert_eq!(pick("cuda", 0), "cuda:0");
        assert_eq!(pick("cuda", 3), "cuda:1");
        assert_eq!(pick("", 5), "cpu");
        assert_eq!(pick("cuda:1", 0), "cuda:1");
        let err = choose("vulkan", 0, None, &offered).unwrap_err().to_string();
        assert!(err.contains("vulkan device"), "{err}");
        let configured: DeviceSpec = "vulkan:2".parse().unwrap();
        assert_eq!(
            choose("vulkan", 0, Some(&configured), &offered)
                .unwrap()
                .to_string(),
            "vulkan:2"
        );
        assert!(
            detect(Some(&configured))
                .iter()
                .any(|(s, _)| s == "vulkan:2")
        );
    }

    /// A worker given a device (a local rank of `--nproc-per-node`) offers that one alone,
    /// with the memory the driver lists; without one it offers every CUDA device.
    #[test]
    fn a_worker_given_a_device_offers_it_alone() {
        let cuda = vec![("cuda:0".to_string(), 80), ("cuda:1".to_string(), 81)];
        let given: DeviceSpec = "cuda:1".parse().unwrap();
        assert_eq!(
            offer(Some(&given), 7, cuda.clone()),
            [("cpu".to_string(), 7), ("cuda:1".to_string(), 81)]
        );
        assert_eq!(offer(None, 7, cuda.clone()).len(), 3);
        assert_eq!(
            offer(Some(&DeviceSpec::Cpu), 7, cuda),
            [("cpu".to_string(), 7)]
        );
    }
}
