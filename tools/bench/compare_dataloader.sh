#!/usr/bin/env bash
# Decode-and-crop throughput of taming-rs's shard loader and of Python WebDataset + PIL on the
# same JPEG shards, one core each, one after the other.
# usage: tools/bench/compare_dataloader.sh PYTHON   (PYTHON with webdataset, pillow, scikit-image)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:?usage: compare_dataloader.sh PYTHON}
shards="$PWD/out/bench-jpeg"   # absolute: cargo bench runs in the crate folder
[ -d "$shards" ] || "$py" tools/bench/make_jpeg_shards.py "$shards" --samples 2000
cargo bench -p taming-dataloader --bench decode --no-run
for size in 256 224; do
    cargo bench -q -p taming-dataloader --bench decode -- "$shards" --size "$size" --threads 1 --passes 3
    "$py" tools/bench/python_decode.py "$shards" --size "$size" --passes 3
done
cargo bench -q -p taming-dataloader --bench decode -- "$shards" --size 256 --threads 2 --passes 3
cargo bench -q -p taming-dataloader --bench decode -- "$shards" --decode-only --passes 3
"$py" tools/bench/python_decode.py "$shards" --decode-only --passes 3
