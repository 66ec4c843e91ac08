//! Ring all-reduce bus bandwidth on loopback against two loopback TCP limits, in one run: one
//! stream alone, and n streams at once in a ring (thread i writing to thread i+1: what the
//! ring's ranks send at the same time, with no reduction).
//! `cargo bench -p taming-collective --bench ring -- [--ranks 2] [--max-mb 256]`.
//! Bus bandwidth = 2(n-1)/n x bytes / time (what each rank sends), as nccl-tests reports it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use taming_collective::{AllReduce, TcpRing};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// One-way TCP throughput of each of `n` streams over loopback running at once, in GB/s.
fn tcp_limit(n: usize, bytes: usize) -> f64 {
    let streams: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || stream(bytes)))
        .collect();
    let slowest = streams
        .into_iter()
        .map(|s| s.join().unwrap())
        .fold(0.0, f64::max);
    bytes as f64 / slowest / 1e9
}

/// Seconds to send `bytes` from one thread to another over loopback TCP.
fn stream(bytes: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = s.read(&mut buf).unwrap();
            left -= n;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..bytes / chunk.len() {
        s.write_all(&chunk).unwrap();
    }
    reader.join().unwrap();
    start.elapsed().as_secs_f64()
}

fn rings(n: usize) -> Vec<TcpRing> {
    TcpRing::loopback(n, 1, Duration::from_secs(60)).unwrap()
}

fn main() {
    let n = arg("--ranks", 2);
    let max_mb = arg("--max-mb", 256);
    println!(
        "loopback TCP, one stream: {:.2} GB/s",
        tcp_limit(1, 512 << 20)
    );
    println!(
        "loopback TCP, {n} streams at once: {:.2} GB/s each",
        tcp_limit(n, 512 << 20)
    );
    let sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| Some(s * 4))
        .take_while(|s| *s <= max_mb)
        .collect();
    let mut group = rings(n);
    println!("| MB | ranks | time (ms) | bus bandwidth (GB/s) |\n| --- | --- | --- | --- |");
    for mb in sizes {
        let floats = (mb << 20) / 4;
        let iters = (64 / mb).clamp(2, 16);
        let handles: Vec<_> = group
            .drain(..)
            .map(|mut ring| {
                std::thread::spawn(move || {
                    let mut buf = vec![1.0f32; floats];
                    ring.all_reduce_sum(&mut buf).unwrap(); // warm-up
                    let start = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut buf).unwrap();
                    }
                    (ring, start.elapsed().as_secs_f64() / iters as f64)
                })
            })
            .collect();
        let mut worst = 0.0f64;
        for h in handles {
            let (ring, t) = h.join().unwrap();
            worst = worst.max(t);
            group.push(ring);
        }
        group.sort_by_key(|r| r.rank());
        let bus = 2.0 * (n - 1) as f64 / n as f64 * (mb << 20) as f64 / worst / 1e9;
        println!("| {mb} | {n} | {:.1} | {bus:.2} |", worst * 1e3);
    }
}
