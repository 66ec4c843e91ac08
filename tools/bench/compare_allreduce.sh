#!/usr/bin/env bash
# The TCP ring's all-reduce and PyTorch's Gloo backend on loopback, one after the other in one
# run on the same machine, with 2 and 4 ranks, 1 to 256 MB.
# Usage: tools/bench/compare_allreduce.sh [PYTHON]
#   PYTHON: an interpreter with torch installed (default python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
for ranks in 2 4; do
    cargo bench -p taming-collective --bench ring -- --ranks "$ranks" --max-mb 256
    "$python" tools/bench/gloo_allreduce.py --ranks "$ranks" --sizes 1 4 16 64 256
done
