#!/usr/bin/env python3
"""Turns Debian's dataset-fashion-mnist (MIT; /usr/share/datasets/fashion-mnist) into the
embedded default data set: WebDataset tar shards of 32x32 RGB PNGs with `.cls` labels and
`.seg.png` label maps (the item's silhouette: pixels brighter than SILHOUETTE get class + 1,
the background 0; 11 labels), the segmentation data of the stage-2 default.

The 28x28 grey images are padded by 2 pixels (background is 0) and replicated to RGB.
Writes data/fashion-mnist/{train,val}-NNNNNN.tar, each shard written under a temporary name
and renamed when complete. Standard library only (plus zlib).

Usage: python3 tools/data/make_fashion_mnist_shards.py [--train N] [--val N] [--per-shard N]
"""
import argparse
import gzip
import io
import os
import pathlib
import struct
import tarfile
import zlib

SOURCE = pathlib.Path("/usr/share/datasets/fashion-mnist")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return [data[16 + i * rows * cols:16 + (i + 1) * rows * cols] for i in range(count)], rows
    return list(data[8:8 + count]), None


SILHOUETTE = 25


def png(grey, side, pad, rgb=True):
    """A minimal PNG of a padded grey image: RGB (replicated) or 8-bit grey."""
    full = side + 2 * pad
    rows = []
    for y in range(full):
        row = bytearray([0])  # filter type 0
        for x in range(full):
            inside = pad <= y < pad + side and pad <= x < pad + side
            v = grey[(y - pad) * side + (x - pad)] if inside else 0
            row += bytes((v, v, v)) if rgb else bytes((v,))
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", full, full, 8, 2 if rgb else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_split(out, split, images, labels, side, start, count, per_shard):
    for shard, first in enumerate(range(start, start + count, per_shard)):
        final = out / f"{split}-{shard:06d}.tar"
        tmp = out / f".{final.name}.partial"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(first + per_shard, start + count)):
                key = f"{split}{i:06d}"
                add(tar, f"{key}.png", png(images[i], side, 2))
                add(tar, f"{key}.cls", str(labels[i]).encode())
                mask = bytes(labels[i] + 1 if v > SILHOUETTE else 0 for v in images[i])
                add(tar, f"{key}.seg.png", png(mask, side, 2, rgb=False))
        os.replace(tmp, final)


def main():
    here = pathlib.Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=here.parent.parent / "data/fashion-mnist")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--per-shard", type=int, default=500)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    images, side = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    labels, _ = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    test_images, _ = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz")
    test_labels, _ = read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    write_split(a.out, "train", images, labels, side, 0, a.train, a.per_shard)
    write_split(a.out, "val", test_images, test_labels, side, 0, a.val, a.per_shard)
    total = sum(f.stat().st_size for f in a.out.glob("*.tar"))
    print(f"{a.train} train + {a.val} val samples, {total / 1e6:.1f} MB in {a.out}")


if __name__ == "__main__":
    main()
