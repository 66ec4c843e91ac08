"""The Python peer of `cargo bench -p taming-dataloader --bench decode`: WebDataset + PIL doing
the same work in one process (one core): read the shards, decode each JPEG, resize the shorter
side to SIZE (bilinear), random crop SIZE, random flip, to CHW float32 in [-1, 1].

With --decode-only it times PIL's JPEG decoding alone over the images read into memory.

usage: python python_decode.py SHARD_DIR [--size 256] [--passes 2] [--decode-only]
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
    a = p.parse_args()
    urls = sorted(glob.glob(f"{a.shards}/train-*.tar"))
    if a.decode_only:
        decode_only(urls, a.passes)
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
