#!/usr/bin/env bash
# The inference benchmark (issue 12): a controller and one inference worker (`lathe worker
# --serve`) on a fresh database, then bench/serve_bench.py — time to first token and tokens/s
# per request at 1, 8 and 32 concurrent chat completions through the `openai` SDK (streaming),
# the same requests one at a time, and transformers `generate` on the same weights and prompts
# as one batch, in this one run. Report in runs/bench-serve/report.json.
#
#   scripts/bench_serve.sh                        # small preset, 64 new tokens, fp32
#   BENCH_PRESET=tiny BENCH_NEW_TOKENS=32 scripts/bench_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench-serve}
PRESET=${BENCH_PRESET:-small}
DTYPE=${BENCH_DTYPE:-fp32}
source scripts/lib/services.sh
ensure_services

rm -rf "$DIR" && mkdir -p "$DIR/data/models"
source scripts/lib/bench_service.sh
MODEL=$PRESET-qwen3
"$LATHE" model init --arch qwen3 --preset "$PRESET" --out "$DIR/data/models/$MODEL" >/dev/null
start_bench_controller serve "$LATHE" "$DIR/data" "$DIR/controller.log" controller --rate-limit-per-minute 0
WORKER_METRICS=$(free_port)
TOKEN=$("$LATHE" admin create-worker --name bench-serve --roles serving 2>/dev/null)
"$LATHE" worker --serve --controller http://127.0.0.1:$GRPC --token "$TOKEN" --device cpu --dtype "$DTYPE" \
  --models-root "$DIR/data/models" --metrics-listen 127.0.0.1:$WORKER_METRICS --serve-max-batch 32 >"$DIR/worker.log" 2>&1 &
BENCH_PIDS+=($!)
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)

.venv/bin/python bench/serve_bench.py --base-url "http://127.0.0.1:$HTTP/v1" --api-key "$KEY" --model "$MODEL" \
  --model-dir "$DIR/data/models/$MODEL" --dtype "$DTYPE" --new-tokens "${BENCH_NEW_TOKENS:-64}" \
  --concurrency "${BENCH_CONCURRENCY:-1,8,32}" --worker-metrics "http://127.0.0.1:$WORKER_METRICS/metrics" \
  --out "$DIR/report.json"
