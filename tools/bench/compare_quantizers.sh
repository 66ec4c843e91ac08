#!/usr/bin/env bash
# Trains each quantizer's photo-crops config (configs/stage1/photo_crops*.yaml: the same
# recipe, only the quantizer differs) for the same number of steps on the embedded photo
# crops, one after the other, and prints one table row per config from the last validation
# (over the whole validation split): L1, PSNR, SSIM, usage, and the last step's perplexity.
# With INCEPTION=FILE (pytorch-fid's weights) it adds rFID.
# Usage: tools/bench/compare_quantizers.sh [STEPS] [OUT]   (default 600 steps, runs/quantizers)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-600}
out=${2:-runs/quantizers}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p taming-worker --bin worker >&2
worker=$target/release/worker
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $steps steps each, batch 8, 64x64 photo crops"
echo "| config | quantizer | codes | val L1 | val PSNR | val SSIM | val usage | perplexity | rFID |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for config in configs/stage1/photo_crops.yaml configs/stage1/photo_crops_rotation.yaml \
    configs/stage1/photo_crops_fsq.yaml configs/stage1/photo_crops_lfq.yaml \
    configs/stage1/photo_crops_simvq.yaml; do
    name=$(basename "$config" .yaml)
    cfg=$config
    if [ -n "${INCEPTION:-}" ]; then
        cfg=$(mktemp --suffix .yaml)
        { cat "$config"; echo "eval: {inception: $INCEPTION}"; } > "$cfg"
    fi
    rm -rf "$out/$name"
    "$worker" train --stage vqgan --steps "$steps" --eval-every "$steps" \
        --checkpoint-every "$steps" --quiet --config "$cfg" --data data/photo-crops \
        --out "$out/$name" >&2
    python3 - "$out/$name/metrics.csv" "$config" <<'PY'
import csv, sys, re
rows = list(csv.DictReader(open(sys.argv[1])))
last = rows[-1]
text = open(sys.argv[2]).read()
kind = re.search(r"kind:\s*(\w+)", text).group(1)
codes = re.search(r"n_embed:\s*(\d+)", text).group(1)
rfid = last.get("val_rfid") or "no Inception weights here"
print(f"| {sys.argv[2].split('/')[-1]} | {kind} | {codes} | {float(last['val_l1']):.4f} | "
      f"{float(last['val_psnr']):.2f} | {float(last['val_ssim']):.4f} | "
      f"{float(last['val_usage']):.3f} | {float(last['perplexity']):.1f} | {rfid} |")
PY
done
