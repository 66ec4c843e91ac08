#!/usr/bin/env bash
# The GPU path on a machine with NVIDIA GPUs (and network for crates and PyPI): builds with
# the `cuda` feature, runs the device tests (worker/tests/gpu.rs, model/cli/tests/gpu.rs) on
# cuda:0, a 2-rank NCCL job on the local mini-cluster when there are two GPUs, and the stage-1
# iteration time at the ImageNet f16 config (256x256, batch 8) beside the reference's on the
# same GPU. Prints everything; record the output in BENCHMARKS.md.
#
# Usage: scripts/gpu-check.sh [PYTHON]
#   PYTHON: an interpreter for the reference (default: a virtualenv made under
#   ~/.cache/taming-rs/gpu-pyenv with tools/fixtures/requirements.txt and CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU here (nvidia-smi missing or failing)" >&2
    exit 1
fi
gpus=$(nvidia-smi -L | wc -l)
echo "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1); $gpus GPU(s); $(nproc) cores"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/taming-rs/target-cuda}
features="--features taming-model/cuda"

echo "== device tests on cuda:0 (the CPU against the GPU, same seeds and batches)"
TAMING_TEST_DEVICE=cuda:0 TAMING_REQUIRE_DEVICE=1 cargo test $features \
    -p taming-worker --test gpu -p taming-model-cli --test gpu -- --nocapture

cargo build --release $features -p taming-coordinator -p taming-worker -p taming-dataloader-cli \
    -p taming-model-cli
if [ "$gpus" -ge 2 ]; then
    echo "== a 2-rank NCCL job (one GPU per rank) on the local mini-cluster"
    out=$(mktemp -d)
    "$CARGO_TARGET_DIR/release/coordinator" launch --stage vqgan --nodes 2 --steps 20 --device cuda \
        --collective nccl --eval-every 20 --checkpoint-every 20 --quiet --out "$out/run" \
        || { echo "error: the NCCL job failed" >&2; exit 1; }
    tail -n 3 "$out/run/metrics.csv"
else
    echo "== one GPU: the 2-rank NCCL job needs two (skipped)"
fi

echo "== stage-1 iteration, ImageNet f16 config, 256x256, batch 8"
cargo bench $features -p taming-worker --bench train_step -- --device cuda:0 \
    --config configs/stage1/imagenet_f16_1024.yaml --batch 8 --iters 10 --json
python=${1:-}
if [ -z "$python" ]; then
    pyenv=$HOME/.cache/taming-rs/gpu-pyenv
    if [ ! -x "$pyenv/bin/python" ]; then
        python3 -m venv "$pyenv"
        "$pyenv/bin/pip" install --quiet -r tools/fixtures/requirements.txt
    fi
    python=$pyenv/bin/python
fi
"$python" tools/bench/reference_train_step.py --device cuda \
    --config configs/stage1/imagenet_f16_1024.yaml --batch 8 --iters 10 --json
