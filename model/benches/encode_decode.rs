//! Encode+decode throughput of the reference's ImageNet f16 VQGAN (ch 128, ch_mult
//! [1,1,2,2,4], 2 res blocks, attention at 16, z 256, 1024 codes, 256x256) on the CPU.
//!
//! `cargo bench -p taming-model --bench encode_decode -- [--batches 1,8] [--iters N] [--json]`
//! Prints images per second and the process's peak resident memory after each batch size
//! (random weights: speed does not depend on them). Batch sizes run in the order given, so
//! list them smallest first for the peak to belong to the batch it follows. tools/bench/compare_reference.sh runs this and the reference side by side.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use taming_model::Vqgan;
use taming_model::config::VqganConfig;
use taming_model::quantize::QuantizeMode;

/// Peak resident memory of this process so far (VmHWM), in MiB; 0 where unknown.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let batches: Vec<usize> = arg(&args, "--batches")
        .unwrap_or_else(|| "1,8".into())
        .split(',')
        .map(|b| b.parse().expect("batch size"))
        .collect();
    let iters: usize = arg(&args, "--iters").map_or(3, |s| s.parse().expect("iterations"));
    let json = args.iter().any(|a| a == "--json");
    let device = Device::flex();
    let model = Vqgan::new(&VqganConfig::imagenet_f16_1024(), &device).expect("valid config");
    for batch in batches {
        let x = Tensor::<4>::random(
            [batch, 3, 256, 256],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let run = || {
            let out = model.forward(x.clone(), QuantizeMode::EVAL);
            out.reconstruction.into_data(); // wait for the result
        };
        run(); // warm-up
        let start = Instant::now();
        for _ in 0..iters {
            run();
        }
        let secs = start.elapsed().as_secs_f64();
        let ips = (batch * iters) as f64 / secs;
        let peak = peak_rss_mib();
        if json {
            println!(
                "{{\"impl\": \"taming-rs\", \"batch\": {batch}, \"iters\": {iters}, \"images_per_s\": {ips:.4}, \"peak_rss_mib\": {peak}}}"
            );
        } else {
            println!(
                "taming-rs  batch {batch}: {ips:.3} images/s ({iters} iterations, {secs:.1} s), peak RSS {peak} MiB"
            );
        }
    }
}
