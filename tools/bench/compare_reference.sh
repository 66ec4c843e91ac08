#!/usr/bin/env bash
# Runs the encode+decode benchmark of taming-rs and of the reference package one after the
# other in one run, on the same machine, and prints both with the machine's description.
# Usage: tools/bench/compare_reference.sh [PYTHON] [ITERS]
#   PYTHON: an interpreter with tools/fixtures/requirements.txt installed (default python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
iters=${2:-3}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
cargo bench -p taming-model --bench encode_decode -- --iters "$iters" --json
"$python" tools/bench/reference_encode_decode.py --iters "$iters" --json
cargo bench -p taming-worker --bench train_step -- --iters "$iters" --json
"$python" tools/bench/reference_train_step.py --iters "$iters" --json
cargo bench -p taming-worker --bench train_step -- --iters "$iters" --json --burn-ops
