#!/usr/bin/env python3
"""Encode+decode throughput of the reference (taming-transformers 0.0.1) ImageNet f16 VQGAN.

Usage: reference_encode_decode.py [--batches 1,8] [--iters N] [--threads T] [--json]
Same model, input size and measurement as model/benches/encode_decode.rs.
"""
import argparse
import json
import pathlib
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "fixtures"))
import reference as ref  # noqa: E402
import torch  # noqa: E402

DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
          ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = ref.VQModel(DD, 1024, 256).eval()
    for batch in [int(b) for b in a.batches.split(",")]:
        x = torch.rand(batch, 3, 256, 256) * 2 - 1

        def run():
            with torch.no_grad():
                _, pre = model.pre_quant(x)
                z_q, _, _ = model.quantize(pre)
                model.decode(z_q)

        run()
        start = time.perf_counter()
        for _ in range(a.iters):
            run()
        secs = time.perf_counter() - start
        ips = batch * a.iters / secs
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        if a.json:
            print(json.dumps({"impl": f"reference (torch {torch.__version__}, "
                                      f"{torch.get_num_threads()} threads)",
                              "batch": batch, "iters": a.iters, "images_per_s": round(ips, 4),
                              "peak_rss_mib": peak}))
        else:
            print(f"reference  batch {batch}: {ips:.3f} images/s ({a.iters} iterations, "
                  f"{secs:.1f} s), peak RSS {peak} MiB")


if __name__ == "__main__":
    main()
