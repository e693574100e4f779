#!/usr/bin/env bash
# What a person with a CUDA GPU runs after scripts/setup.sh: `lathe doctor`, logits parity with
# transformers on the GPU (fp32, bf16), a LoRA run on the GPU against the CPU, tokens/s and peak
# device memory (the CUDA caching allocator's count) for the small preset beside transformers +
# PEFT, and a Qwen3-4B-shaped run when the GPU has the memory. One table at the end; the exit
# code is non-zero if a check fails. See bench/gpu_check.py for each check and its bound.
#
# Without a GPU it says what it would check and runs the same harness on the CPU (tiny preset),
# which is how the test suite keeps it working on machines that have none.
#
#   scripts/gpu_check.sh [--device cuda:1] [--skip-4b] [--out runs/gpu_check]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "gpu_check: run scripts/setup.sh first" >&2; exit 1; }
export LATHE_BIN=${LATHE_BIN:-$PWD/target/release/lathe}
exec .venv/bin/python bench/gpu_check.py "$@"
