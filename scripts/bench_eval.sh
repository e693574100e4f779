#!/usr/bin/env bash
# Generation and evaluation throughput on CPU: Lathe's KV-cached greedy
# generation against transformers `generate` on the same weights in the same run (tokens/s,
# and whether the tokens agree), and `lathe eval run` items/s on CTI-MCQ and CTI-RCM, for the
# tiny and small presets. CTIBench is read from ../shared/datasets/ctibench (or BENCH_DATA_DIR).
#
#   scripts/bench_eval.sh
#   BENCH_PRESETS=tiny BENCH_NEW_TOKENS=128 scripts/bench_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BENCH_DIR:-runs/bench-eval}
mkdir -p "$DIR"
.venv/bin/python bench/generate_bench.py --lathe "${LATHE_BIN:-target/release/lathe}" --work "$DIR" \
  --data-dir "${BENCH_DATA_DIR:-../shared/datasets/ctibench}" --presets "${BENCH_PRESETS:-tiny,small}" \
  --batch "${BENCH_BATCH:-4}" --new-tokens "${BENCH_NEW_TOKENS:-64}" --eval-limit "${BENCH_EVAL_LIMIT:-24}"
echo "report: $DIR/report.json"
