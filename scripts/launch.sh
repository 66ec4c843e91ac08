#!/usr/bin/env bash
# The main job, both stages on the embedded Fashion-MNIST shards, each through
# `coordinator launch` on a local mini-cluster (a coordinator, worker processes and a
# dataloader service; logs in <out>/logs/):
#   1. stage 1: `coordinator launch --stage vqgan --nodes 1` -> runs/vqgan/ (metrics.csv,
#      loss.png, val_grid.png, model/, checkpoints/). Extra arguments go to this launch
#      (e.g. --steps 200, --out runs/other, --resume, --config configs/stage1/....yaml).
#   2. stage 2: `coordinator launch --stage transformer --vqgan runs/vqgan/model --cond class`
#      -> runs/transformer/ (metrics.csv, samples.png: a row per class, model/, checkpoints/).
#      STAGE2_STEPS (default 300) sets its length; STAGE2_STEPS=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Chart text needs a font; the charts are drawn without text when it is missing.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 || true)
fi
# The data loader links libjpeg-turbo (its JPEG window decoder).
if ! pkg-config --exists libjpeg 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq libjpeg62-turbo-dev pkg-config >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq libjpeg62-turbo-dev pkg-config >/dev/null; })
fi
cargo build --release -p taming-coordinator -p taming-worker -p taming-dataloader-cli -p taming-model-cli
bin=${CARGO_TARGET_DIR:-target}/release
args=("$@")
[[ " $* " == *" --steps "* ]] || args+=(--steps 500)
out=runs/vqgan
if [[ " $* " == *" --out "* ]]; then
    for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = --out ] && out=${args[$((i + 1))]}; done
else
    args+=(--out "$out")
fi
move_aside() {
    echo "$1 holds a finished or interrupted run: moving it to $1.previous"
    rm -rf "$1.previous" && mv "$1" "$1.previous"
}
if [ -e runs/vqgan/checkpoints/latest ] && [[ " $* " != *" --out "* ]] && [[ " $* " != *" --resume "* ]]; then
    move_aside runs/vqgan
fi
"$bin/coordinator" launch --stage vqgan --nodes 1 "${args[@]}"

steps2=${STAGE2_STEPS:-300}
[ "$steps2" -gt 0 ] || exit 0
[ -e runs/transformer/checkpoints/latest ] && move_aside runs/transformer
"$bin/coordinator" launch --stage transformer --nodes 1 --vqgan "$out/model" --cond class \
    --steps "$steps2" --eval-every 50 --checkpoint-every 100 --out runs/transformer
echo "samples: runs/transformer/samples.png; more with:"
echo "  $bin/vqgan sample --transformer runs/transformer/model --vqgan $out/model --class 7 --n 16 --out class7.png"
