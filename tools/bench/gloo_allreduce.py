#!/usr/bin/env python3
"""PyTorch's Gloo all-reduce on loopback: the peer of
`cargo bench -p taming-collective --bench ring`.

N processes on 127.0.0.1 (torch.distributed, backend "gloo", one thread each) sum a float32
tensor of each size. Per size: one warm-up, then --iters timed all-reduces, each after a
barrier; a call's time is the slowest rank's (all-reduce MAX of the elapsed times), and the
report is the best of those. Bus bandwidth follows nccl-tests: 2(n-1)/n * bytes / time.
MB is 2^20 bytes and GB/s 1e9 bytes/s, as in collective/benches/ring.rs.

Usage: gloo_allreduce.py [--sizes MB ...] [--ranks N] [--iters N] [--json]
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, args, port, queue):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    try:
        for mb in args.sizes:
            numel = int(mb * 1024 * 1024) // 4
            tensor = torch.full((numel,), float(rank + 1), dtype=torch.float32)
            dist.all_reduce(tensor)
            expected = args.ranks * (args.ranks + 1) / 2
            if tensor[0].item() != expected or tensor[-1].item() != expected:
                raise RuntimeError(f"rank {rank}: sum {tensor[0].item()} != {expected}")
            best = float("inf")
            for _ in range(args.iters):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                best = min(best, elapsed.item())
            if rank == 0:
                queue.put((int(mb) if mb.is_integer() else mb, numel * 4, best))
    finally:
        dist.destroy_process_group()


def report(args, mb, nbytes, secs):
    n = args.ranks
    bus_gbps = 2 * (n - 1) / n * nbytes / secs / 1e9
    if args.json:
        print(json.dumps({"impl": "gloo", "mb": mb, "ranks": n, "ms": round(secs * 1e3, 3),
                          "bus_gbps": round(bus_gbps, 3)}), flush=True)
    else:
        print(f"gloo  {mb:g} MB  {n} ranks: {secs * 1e3:.3f} ms  bus {bus_gbps:.3f} GB/s",
              flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.ranks < 2:
        p.error("--ranks must be at least 2")
    if min(args.sizes) <= 0 or args.iters < 1:
        p.error("--sizes and --iters must be positive")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(worker, args=(args, free_port(), queue), nprocs=args.ranks,
                               join=False, start_method="spawn")
    while not procs.join(timeout=0.5):
        while not queue.empty():
            report(args, *queue.get())
    while not queue.empty():
        report(args, *queue.get())


if __name__ == "__main__":
    main()
