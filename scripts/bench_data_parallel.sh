#!/usr/bin/env bash
# Data-parallel scaling (docs/data-parallel.md): 2 ranks × 1 thread against 1 process × 2
# threads on the small preset, same rows and global batch, in one run; the all-reduce's share of
# a step; and the on-paper estimate for Qwen3-4B LoRA r64 on 8×H100. See
# bench/data_parallel_bench.py.
#
#   scripts/bench_data_parallel.sh
#
# Env: LATHE_BIN, BENCH_DIR (runs/bench_dp), BENCH_PRESET (small), BENCH_SEQ (256),
#      BENCH_BATCH (4, global), BENCH_STEPS (5; the first is not counted).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
export LATHE_BIN=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench_dp}
PRESET=${BENCH_PRESET:-small}
SEQ=${BENCH_SEQ:-256}
BATCH=${BENCH_BATCH:-4}
STEPS=${BENCH_STEPS:-5}
[ -x "$LATHE_BIN" ] || { echo "bench: no lathe binary at $LATHE_BIN (run scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$DIR"
MODEL="$DIR/model-qwen3-$PRESET"
[ -f "$MODEL/config.json" ] || "$LATHE_BIN" model init --arch qwen3 --preset "$PRESET" --seed 0 --out "$MODEL"
"$PY" bench/make_data.py --model "$MODEL" --rows $((STEPS * BATCH)) --seq-len "$SEQ" --reserve 1 --out "$DIR/data" >&2
"$PY" bench/data_parallel_bench.py --model "$MODEL" --data "$DIR/data/train.jsonl" --out "$DIR" \
  --batch "$BATCH" --seq "$SEQ" --steps "$STEPS"
