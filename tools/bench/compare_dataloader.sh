#!/usr/bin/env bash
# Decode-and-crop throughput of taming-rs's shard loader and of Python WebDataset + PIL on the
# same JPEG shards, one core each, one after the other; then both as a trainer sees them.
# usage: tools/bench/compare_dataloader.sh PYTHON   (PYTHON with webdataset, pillow, scikit-image, torch)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:?usage: compare_dataloader.sh PYTHON}
shards="$PWD/out/bench-jpeg"   # absolute: cargo bench runs in the crate folder
imagenet="$PWD/out/bench-imagenet"
[ -d "$shards" ] || "$py" tools/bench/make_jpeg_shards.py "$shards" --samples 2000
[ -d "$imagenet" ] || "$py" tools/bench/make_jpeg_shards.py "$imagenet" --samples 2000 --imagenet
cargo bench -p taming-dataloader --bench decode --no-run
# ImageNet-shaped photos (shorter side 320-400) to 256 and 224, then the 256x256 shards.
for size in 256 224; do
    cargo bench -q -p taming-dataloader --bench decode -- "$imagenet" --size "$size" --threads 1 --passes 3
    "$py" tools/bench/python_decode.py "$imagenet" --size "$size" --passes 3
done
cargo bench -q -p taming-dataloader --bench decode -- "$imagenet" --decode-only --size 256 --passes 3
"$py" tools/bench/python_decode.py "$imagenet" --decode-only --passes 3
for size in 256 224; do
    cargo bench -q -p taming-dataloader --bench decode -- "$shards" --size "$size" --threads 1 --passes 3
    "$py" tools/bench/python_decode.py "$shards" --size "$size" --passes 3
done
cargo bench -q -p taming-dataloader --bench decode -- "$shards" --size 256 --threads 2 --passes 3
cargo bench -q -p taming-dataloader --bench decode -- "$shards" --decode-only --passes 3
"$py" tools/bench/python_decode.py "$shards" --decode-only --passes 3
# A trainer's view: batches of 32 for a step that leaves the CPU free (sleeps) 0, 25 or 50 ms,
# decoded inside the step or ahead (taming-rs: Prefetched, 2 ahead; torch: a DataLoader worker).
for step in 0 25 50; do
    for ahead in 0 2; do
        cargo bench -q -p taming-dataloader --bench decode -- "$shards" --threads 1 --step-ms "$step" --prefetch "$ahead"
    done
    for workers in 0 1; do
        "$py" tools/bench/python_decode.py "$shards" --step-ms "$step" --workers "$workers"
    done
done
