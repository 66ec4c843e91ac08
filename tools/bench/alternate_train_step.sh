#!/usr/bin/env bash
# The stage-1 training-iteration benchmark of taming-rs and of the reference, alternated ROUNDS
# times in one run (this machine's neighbours make single runs vary by 10-20%), then the best
# and the median of each side.
# Usage: tools/bench/alternate_train_step.sh [PYTHON] [ROUNDS] [ITERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
rounds=${2:-5}
iters=${3:-3}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
cargo bench -p taming-worker --bench train_step --no-run 2>/dev/null
ours=() theirs=()
for _ in $(seq "$rounds"); do
  ours+=("$(cargo bench -q -p taming-worker --bench train_step -- --iters "$iters" --json 2>/dev/null |
    sed -n 's/.*"seconds_per_iteration": \([0-9.]*\).*/\1/p')")
  theirs+=("$("$python" tools/bench/reference_train_step.py --iters "$iters" --json 2>/dev/null |
    sed -n 's/.*"seconds_per_iteration": \([0-9.]*\).*/\1/p')")
  echo "round: taming-rs ${ours[-1]} s, reference ${theirs[-1]} s"
done
summary() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "best %.3f s, median %.3f s", v[1], v[int((NR+1)/2)]}'; }
echo "taming-rs: $(summary "${ours[@]}")"
echo "reference: $(summary "${theirs[@]}")"
