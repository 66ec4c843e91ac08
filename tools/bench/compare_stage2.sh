#!/usr/bin/env bash
# Stage-2 speed of taming-rs and of the reference package, one after the other in one run on
# the same machine: training tokens/s, sampling tokens/s at 256 tokens (batch 1 and 16, with
# and without the KV cache; the reference has no cache) and a 32x48 sliding-window grid.
# With REFERENCE_SRC (a checkout of CompVis/taming-transformers), both also sample with the
# reference's 12-layer, 512-wide GPT, the reference through its cached `sample_with_past`.
# Usage: tools/bench/compare_stage2.sh [PYTHON] [ITERS] [REFERENCE_SRC]
#   PYTHON: an interpreter with tools/fixtures/requirements.txt installed (default python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
iters=${2:-5}
src=${3:-}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
cargo bench -p taming-worker --bench stage2 -- --iters "$iters"
"$python" tools/bench/reference_stage2.py --iters "$iters" ${src:+--reference-src "$src"}
