#!/usr/bin/env bash
# Prepares a fresh clone: a project-local Python venv with the libtorch that tch 0.26 links
# against (torch==2.13.0 from PyPI) plus the reference stack used by the interop tests, a cargo
# config pointing the build at that libtorch (with an rpath, so binaries run without
# LD_LIBRARY_PATH), and a release build of the workspace. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*"; }

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; install Python 3.10+" >&2; exit 1; }

step "Slurm for the Slurm tests (slurmctld, slurmd, slurm-client, munge; never started as services)"
source scripts/lib/slurm.sh
ensure_slurm_packages

if [ ! -x "$VENV/bin/python" ]; then
  step "creating Python venv in .venv"
  "$PYTHON" -m venv "$VENV"
fi

LLAMA_CPP_PYTHON=0.3.36
step "installing Python packages (torch 2.13.0 = the libtorch of tch 0.26; transformers, peft for interop tests)"
"$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements.txt

# llama.cpp itself, for the GGUF export check (tests/interop/test_gguf.py). PyPI has only its
# source: pip builds it with CMake (~10 CPU-minutes, once; pip caches the wheel), portable
# (no -march=native) and without llama.cpp's own tools.
if ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  step "building llama-cpp-python $LLAMA_CPP_PYTHON (llama.cpp on CPU, for the GGUF check; a few minutes)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/pip" install -q --disable-pip-version-check "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi

step "npm packages for the Kubernetes manifest checks (tests/deploy: @kubernetes-models/keda and prometheus-operator, yaml)"
if command -v npm >/dev/null; then
  # Exactly the versions in tests/deploy/package-lock.json; node_modules is rebuilt each run.
  (cd tests/deploy && npm ci --no-audit --no-fund)
else
  echo "setup: npm not found; tests/service/test_k8s_manifests.py needs Node.js and npm (apt-get install nodejs npm)" >&2
fi

TORCH_DIR=$("$VENV/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
step "libtorch: $TORCH_DIR"

mkdir -p .cargo
cat > .cargo/config.toml <<CFG
# Written by scripts/setup.sh for this checkout; do not commit.
[env]
LIBTORCH = "$TORCH_DIR"
# The pip wheel is a complete libtorch; pointing LIBTORCH at it is what
# LIBTORCH_USE_PYTORCH=1 does, without needing the venv on PATH at build time.
LIBTORCH_CXX11_ABI = "1"

[build]
rustflags = ["-C", "link-arg=-Wl,-rpath,$TORCH_DIR/lib"]
CFG

step "building the workspace (release)"
cargo build --release --locked -p lathe-cli -p lathe-controller
ln -sf "$ROOT/target/release/lathe" "$VENV/bin/lathe"
step "done: $ROOT/target/release/lathe (also on PATH inside .venv)"
