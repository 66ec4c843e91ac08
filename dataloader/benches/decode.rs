//! Decode-and-crop throughput of the shard loader: `cargo bench -p taming-dataloader --bench
//! decode -- SHARD_DIR [--size 256] [--threads 1] [--passes 2]`. Shards come from
//! tools/bench/make_jpeg_shards.py; tools/bench/compare_dataloader.sh runs this beside the
//! Python WebDataset + PIL peer (tools/bench/python_decode.py) on the same shards.

use std::time::Instant;

use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ShardLoader};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args
        .iter()
        .find(|a| !a.starts_with("--") && !a.chars().all(|c| c.is_ascii_digit()))
    else {
        eprintln!("usage: decode SHARD_DIR [--size 256] [--threads 1] [--passes 2]");
        return;
    };
    let (size, threads, passes) = (
        arg(&args, "--size", 256),
        arg(&args, "--threads", 1),
        arg(&args, "--passes", 2),
    );
    let shards = list_split(dir, "train").expect("benchmark shards");
    let pre = Preprocess {
        size,
        random_crop: true,
        flip: true,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut best = 0.0f64;
    let mut n = 0;
    for _ in 0..passes {
        let cfg = LoaderConfig::simple(32, pre, 0, false);
        let mut loader = ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap();
        let start = Instant::now();
        n = 0;
        pool.install(|| {
            while let Some(b) = loader.next_in_epoch().unwrap() {
                n += b.keys.len();
            }
        });
        best = best.max(n as f64 / start.elapsed().as_secs_f64());
    }
    println!(
        "taming-rs size {size}: {best:.1} img/s on {threads} decode thread(s), {:.1} per thread ({n} images)",
        best / threads as f64
    );
}
