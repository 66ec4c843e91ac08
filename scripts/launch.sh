#!/usr/bin/env bash
# The main job: stage-1 (VQGAN) training on the embedded Fashion-MNIST shards, as
# `coordinator launch --stage vqgan --nodes 1` on a local mini-cluster (a coordinator, a
# worker process and a dataloader service; logs in runs/vqgan/logs/). Extra arguments go to `coordinator launch`
# (e.g. --steps 200, --out runs/other, --resume, --config configs/stage1/....yaml).
# Output: runs/vqgan/ (metrics.csv, loss.png, val_grid.png, model/, checkpoints/).
set -euo pipefail
cd "$(dirname "$0")/.."
# Chart text needs a font; the charts are drawn without text when it is missing.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 || true)
fi
cargo build --release -p taming-coordinator -p taming-worker -p taming-dataloader-cli
bin=${CARGO_TARGET_DIR:-target}/release
args=("$@")
[[ " $* " == *" --steps "* ]] || args+=(--steps 500)
[[ " $* " == *" --out "* ]] || args+=(--out runs/vqgan)
if [ -e runs/vqgan/checkpoints/latest ] && [[ " $* " != *" --out "* ]] && [[ " $* " != *" --resume "* ]]; then
    echo "runs/vqgan holds a finished or interrupted run: moving it to runs/vqgan.previous"
    rm -rf runs/vqgan.previous && mv runs/vqgan runs/vqgan.previous
fi
"$bin/coordinator" launch --stage vqgan --nodes 1 "${args[@]}"
