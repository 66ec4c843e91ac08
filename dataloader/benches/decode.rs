//! Decode-and-crop throughput of the shard loader: `cargo bench -p taming-dataloader --bench
//! decode -- SHARD_DIR [--size 256] [--threads 1] [--passes 2]`. Shards come from
//! tools/bench/make_jpeg_shards.py; tools/bench/compare_dataloader.sh runs this beside the
//! Python WebDataset + PIL peer (tools/bench/python_decode.py) on the same shards. With
//! `--decode-only` it times, over the shards' images held in memory, whole-image JPEG decoding
//! (the `image` crate) and the transform at `--size` both ways: the full-decode path
//! ([`Preprocess::apply_full_decode`]) and the JPEG window path the loader takes.
//!
//! With `--step-ms MS [--prefetch N] [--batches B]` it is a trainer's view instead: batches of
//! 32 taken by a loop whose step leaves the CPU free for MS milliseconds (it sleeps, as a host
//! does while its accelerator computes), with N batches decoded ahead (0: inside the step);
//! it prints the mean wait for a batch and the images per second that result.

use std::time::{Duration, Instant};

use taming_dataloader::shards::list_split;
use taming_dataloader::{
    BatchSource, LoaderConfig, LoaderState, Prefetched, Preprocess, ShardLoader,
};

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
    if args.iter().any(|a| a == "--decode-only") {
        decode_only(&shards, size, arg(&args, "--passes", 2));
        return;
    }
    let pre = Preprocess {
        size,
        random_crop: true,
        flip: true,
    };
    if args.iter().any(|a| a == "--step-ms") {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .unwrap();
        let step = Duration::from_millis(arg(&args, "--step-ms", 0) as u64);
        overlap(
            &shards,
            pre,
            step,
            arg(&args, "--prefetch", 0),
            arg(&args, "--batches", 40),
        );
        return;
    }
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

/// Over every `.jpg` of the shards read into memory first, one thread: whole-image decoding,
/// then the random-crop transform at `size` by the full-decode path and by the window path.
fn decode_only(shards: &[String], size: usize, passes: usize) {
    let images = read_images(shards);
    let pre = Preprocess {
        size,
        random_crop: true,
        flip: true,
    };
    let decode = |b: &[u8]| {
        std::hint::black_box(image::load_from_memory(b).expect("a JPEG").to_rgb8());
    };
    let full = |b: &[u8]| {
        std::hint::black_box(pre.apply_full_decode(b, &mut rand::rng()).expect("a JPEG"));
    };
    let rate = |f: &dyn Fn(&[u8])| best_rate(&images, passes, f);
    println!(
        "taming-rs decode only: {:.1} img/s on 1 thread ({} images)",
        rate(&decode),
        images.len()
    );
    let window = |b: &[u8]| {
        std::hint::black_box(pre.apply(b, &mut rand::rng()).expect("a JPEG"));
    };
    println!(
        "taming-rs full-decode path at {size}: {:.1} img/s",
        rate(&full)
    );
    println!(
        "taming-rs window path at {size}: {:.1} img/s",
        rate(&window)
    );
}

/// The best of `passes` rates (images per second) of `f` over `images`.
fn best_rate(images: &[Vec<u8>], passes: usize, f: &dyn Fn(&[u8])) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..passes {
        let start = Instant::now();
        images.iter().for_each(|b| f(b));
        best = best.max(images.len() as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Every `.jpg` of the shards, read into memory.
fn read_images(shards: &[String]) -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    for shard in shards {
        let mut archive = tar::Archive::new(std::fs::File::open(shard).expect("a local shard"));
        for entry in archive.entries().expect("a tar") {
            let mut entry = entry.expect("an entry");
            if entry
                .path()
                .is_ok_and(|p| p.extension().is_some_and(|e| e == "jpg"))
            {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut bytes).expect("reading");
                images.push(bytes);
            }
        }
    }
    images
}

/// Batches of 32 for `batches` steps that each leave the CPU free for `step`, with `depth`
/// batches decoded ahead (0: none), after one batch of warm-up.
fn overlap(shards: &[String], pre: Preprocess, step: Duration, depth: usize, batches: usize) {
    let cfg = LoaderConfig::simple(32, pre, 0, true);
    let loader = ShardLoader::open(shards, cfg, &LoaderState::default()).unwrap();
    let mut source: Box<dyn BatchSource> = match depth {
        0 => Box::new(loader),
        d => Box::new(Prefetched::new(Box::new(loader), d)),
    };
    source.next_batch().unwrap();
    let (start, mut waited) = (Instant::now(), Duration::ZERO);
    for _ in 0..batches {
        let asked = Instant::now();
        let batch = std::hint::black_box(source.next_batch().unwrap());
        waited += asked.elapsed();
        drop(batch);
        std::thread::sleep(step);
    }
    let ips = (32 * batches) as f64 / start.elapsed().as_secs_f64();
    println!(
        "taming-rs step {} ms, {depth} ahead: waited {:.1} ms per batch, {ips:.1} img/s",
        step.as_millis(),
        waited.as_secs_f64() * 1e3 / batches as f64
    );
}
