"""Benchmark shards: random 256x256 crops of the colour photos in scikit-image's data folder,
re-scaled at random and saved as JPEG (quality 90), packed as WebDataset tars.

With --imagenet the samples are shaped like ImageNet's: 4:3 or 3:4 crops whose shorter side is
320 to 400 pixels (500x375 is the commonest ImageNet shape).

usage: python make_jpeg_shards.py OUT_DIR [--samples 2000] [--per-shard 500] [--imagenet]
"""

import argparse
import io
import os
import random
import tarfile

import skimage
from PIL import Image


def photos():
    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    for name in sorted(os.listdir(data)):
        if not name.endswith((".png", ".jpg")):
            continue
        img = Image.open(os.path.join(data, name))
        if img.mode == "RGB" and min(img.size) >= 256:
            yield img


def crops(n, rng):
    pool = list(photos())
    for _ in range(n):
        img = rng.choice(pool)
        scale = rng.uniform(256 / min(img.size), 1.0)
        w, h = int(img.width * scale), int(img.height * scale)
        img = img.resize((max(w, 256), max(h, 256)), Image.BILINEAR)
        x, y = rng.randint(0, img.width - 256), rng.randint(0, img.height - 256)
        yield img.crop((x, y, x + 256, y + 256))


def imagenet_like(n, rng):
    pool = list(photos())
    for _ in range(n):
        img = rng.choice(pool)
        short = rng.randint(320, 400)
        long_ = short * 4 // 3
        landscape = rng.random() < 0.75
        aw, ah = (4, 3) if landscape else (3, 4)
        cw = min(img.width, img.height * aw // ah)
        ch = cw * ah // aw
        x, y = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
        size = (long_, short) if landscape else (short, long_)
        yield img.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--imagenet", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(0)
    tar = None
    samples = imagenet_like if a.imagenet else crops
    for i, img in enumerate(samples(a.samples, rng)):
        if i % a.per_shard == 0:
            if tar:
                tar.close()
            tar = tarfile.open(os.path.join(a.out, f"train-{i // a.per_shard:06d}.tar"), "w")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 10).encode())):
            info = tarfile.TarInfo(f"{i:08d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()


if __name__ == "__main__":
    main()
