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
DB=lathe_bench_serve_$(date +%s)
export LATHE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export LATHE_REDIS_PREFIX="lathe-bench-$DB:"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); GRPC=$(free_port); WORKER_METRICS=$(free_port)
MODEL=$PRESET-qwen3

"$LATHE" model init --arch qwen3 --preset "$PRESET" --out "$DIR/data/models/$MODEL" >/dev/null
"$LATHE" controller --http-listen 127.0.0.1:$HTTP --grpc-listen 127.0.0.1:$GRPC --data-dir "$DIR/data" \
  --rate-limit-per-minute 0 >"$DIR/controller.log" 2>&1 &
CONTROLLER=$!
cleanup() {
  kill -TERM ${WORKER:-} $CONTROLLER 2>/dev/null || true
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$HTTP/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.3
done
TOKEN=$("$LATHE" admin create-worker --name bench-serve 2>/dev/null)
"$LATHE" worker --serve --controller http://127.0.0.1:$GRPC --token "$TOKEN" --device cpu --dtype "$DTYPE" \
  --models-root "$DIR/data/models" --metrics-listen 127.0.0.1:$WORKER_METRICS --serve-max-batch 32 >"$DIR/worker.log" 2>&1 &
WORKER=$!
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)

.venv/bin/python bench/serve_bench.py --base-url "http://127.0.0.1:$HTTP/v1" --api-key "$KEY" --model "$MODEL" \
  --model-dir "$DIR/data/models/$MODEL" --dtype "$DTYPE" --new-tokens "${BENCH_NEW_TOKENS:-64}" \
  --concurrency "${BENCH_CONCURRENCY:-1,8,32}" --worker-metrics "http://127.0.0.1:$WORKER_METRICS/metrics" \
  --out "$DIR/report.json"
