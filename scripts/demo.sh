#!/usr/bin/env bash
# The main job on the embedded data: import a checkpoint written by the reference
# (taming-transformers) and reconstruct a real photo through it. Output: out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/demo
mkdir -p "$out"
fixture=model/tests/fixtures/vqgan/vq_a
cargo build --release -p taming-model-cli --bin vqgan
vqgan=${CARGO_TARGET_DIR:-target}/release/vqgan
"$vqgan" import-taming --config "$fixture/model.yaml" --ckpt "$fixture/model.ckpt" --out "$out/model" --force
"$vqgan" encode --model "$out/model" --image "$fixture/photo_0.png" --out "$out/codes.json"
"$vqgan" decode --model "$out/model" --codes "$out/codes.json" --out "$out/decoded.png"
"$vqgan" reconstruct --model "$out/model" --image "$fixture/photo_0.png" --out "$out/reconstruction.png"
echo "wrote $out/codes.json, $out/decoded.png and $out/reconstruction.png"
