"""The Python peer of `cargo bench -p taming-dataloader --bench decode`: WebDataset + PIL doing
the same work in one process (one core): read the shards, decode each JPEG, resize the shorter
side to SIZE (bilinear), random crop SIZE, random flip, to CHW float32 in [-1, 1].

With --decode-only it times PIL's JPEG decoding alone over the images read into memory.

With --step-ms MS [--workers W] [--batches B] it is a trainer's view: a torch DataLoader with W
worker processes (prefetch_factor 2; 0: decoded in the main process inside the step) hands
batches of 32 to a loop whose step sleeps MS milliseconds; it prints the mean wait for a batch
and the images per second.

usage: python python_decode.py SHARD_DIR [--size 256] [--passes 2] [--decode-only]
       python python_decode.py SHARD_DIR --step-ms MS [--workers 1] [--batches 40]
"""

import argparse
import glob
import io
import random
import tarfile
import time

import numpy as np
import webdataset as wds
from PIL import Image


def preprocess(img, size, rng):
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(round(w * s), size), max(round(h * s), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    x, y = rng.randint(0, nw - size), rng.randint(0, nh - size)
    img = img.crop((x, y, x + size, y + size))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--decode-only", action="store_true")
    p.add_argument("--step-ms", type=int)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    a = p.parse_args()
    urls = sorted(glob.glob(f"{a.shards}/train-*.tar"))
    if a.decode_only:
        decode_only(urls, a.passes)
        return
    if a.step_ms is not None:
        overlap(urls, a.size, a.step_ms, a.workers, a.batches)
        return
    rng = random.Random(0)
    best = 0.0
    for _ in range(a.passes):
        ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
        start, n = time.perf_counter(), 0
        for sample in ds:
            preprocess(sample["jpg"], a.size, rng)
            n += 1
        best = max(best, n / (time.perf_counter() - start))
    print(f"python webdataset+PIL size {a.size}: {best:.1f} img/s on 1 core ({n} images)")


def overlap(urls, size, step_ms, workers, batches):
    import torch

    torch.set_num_threads(1)
    rng = random.Random(0)
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .map(lambda s: preprocess(s["jpg"], size, rng))
        .batched(32)
    )
    extra = {"prefetch_factor": 2} if workers else {}
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, **extra))
    next(loader)
    start, waited = time.perf_counter(), 0.0
    for _ in range(batches):
        asked = time.perf_counter()
        batch = next(loader)
        waited += time.perf_counter() - asked
        del batch
        time.sleep(step_ms / 1000)
    ips = 32 * batches / (time.perf_counter() - start)
    print(
        f"python DataLoader step {step_ms} ms, {workers} worker(s): "
        f"waited {waited * 1e3 / batches:.1f} ms per batch, {ips:.1f} img/s"
    )


def decode_only(urls, passes):
    images = []
    for url in urls:
        with tarfile.open(url) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for data in images:
            Image.open(io.BytesIO(data)).convert("RGB")
        best = max(best, len(images) / (time.perf_counter() - start))
    print(f"python PIL decode only: {best:.1f} img/s on 1 core ({len(images)} images)")


if __name__ == "__main__":
    main()
