#!/usr/bin/env python3
"""Makes the second embedded data set: 64x64 crops of real photos, as WebDataset tar shards of
JPEG samples (no labels), in data/photo-crops/{train,val}-000000.tar.

The photos are the colour ones in scikit-image's data folder that are public domain or CC0
(their licences are stated in skimage/data/_fetchers.py): astronaut (NASA), chelsea and
coffee (CC0), rocket (SpaceX, public domain), hubble_deep_field (NASA) and retina (CC0).
Each photo is resized so that its shorter side is one of several lengths, and random 64x64
windows are cut from it (random horizontal flips), with a fixed seed; validation crops are
drawn the same way with another seed. Shards are written under a temporary name and renamed.

Usage: python3 tools/data/make_photo_crop_shards.py [--train N] [--val N] [--quality Q]
(needs Pillow and scikit-image)
"""
import argparse
import io
import os
import pathlib
import random
import tarfile

from PIL import Image

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg"]
SHORTER_SIDES = [96, 128, 192, 256]
SIZE = 64


def crops(images, count, seed):
    rng = random.Random(seed)
    for i in range(count):
        name, img = images[i % len(images)]
        side = rng.choice(SHORTER_SIDES)
        w, h = img.size
        scale = side / min(w, h)
        scaled = img.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))),
                            Image.BICUBIC)
        x = rng.randint(0, scaled.width - SIZE)
        y = rng.randint(0, scaled.height - SIZE)
        crop = scaled.crop((x, y, x + SIZE, y + SIZE))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        yield f"{name}-{i:05d}", crop


def write_shard(path, samples, quality):
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, img in samples:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = buf.tell()
            info.mtime = 0
            buf.seek(0)
            tar.addfile(info, buf)
    os.replace(tmp, path)


def main():
    import skimage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=120)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[2] / "data/photo-crops")
    args = parser.parse_args()
    source = pathlib.Path(skimage.__file__).parent / "data"
    images = [(p.split(".")[0].replace("_", "-"), Image.open(source / p).convert("RGB"))
              for p in PHOTOS]
    args.out.mkdir(parents=True, exist_ok=True)
    write_shard(args.out / "train-000000.tar", crops(images, args.train, 0), args.quality)
    write_shard(args.out / "val-000000.tar", crops(images, args.val, 1), args.quality)
    for p in sorted(args.out.iterdir()):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
