#!/usr/bin/env bash
# Runs each cargo fuzz target (fuzz/fuzz_targets: the checkpoint pickle reader, shards through
# the loader, images through the transform, the dataloader service's request check) for SECONDS (default 45) from a copy of
# its committed corpus (fuzz/corpus/TARGET), with a 2 GiB memory and a 10 s time limit per
# input. A crash, an out-of-memory or a timeout fails the script and leaves the input under
# fuzz/artifacts/TARGET/. Installs cargo-fuzz when missing; builds without a sanitizer (the
# code is safe Rust: what is looked for is panics, unbounded allocation and hangs) on stable
# Rust (RUSTC_BOOTSTRAP=1 lets cargo fuzz pass its -Z flags), in a target directory of its own.
# libjpeg-turbo, which the image target reaches, is not instrumented: its inputs are found
# through the Rust code's coverage and the seed JPEGs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-45}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${TAMING_FUZZ_TARGET:-$HOME/.cache/taming-rs/fuzz-target}"
cargo fuzz build --sanitizer none
for target in pickle shard image request; do
    corpus=$(mktemp -d)
    cp -r "corpus/$target/." "$corpus/"
    echo "== fuzz $target for ${seconds}s"
    log=$(mktemp)
    set +e
    cargo fuzz run --sanitizer none "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 >"$log" 2>&1
    status=$?
    set -e
    grep -E "DONE|==[0-9]+==|SUMMARY|thread '|panicked" "$log" || tail -20 "$log"
    rm -rf "$corpus" "$log"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $target failed: see fuzz/artifacts/$target/" >&2
        exit "$status"
    fi
done
