#!/usr/bin/env bash
# The service benchmark: starts a controller and one idle worker on
# a fresh database, then runs bench/service_bench.py — submit-to-claimed latency, metric points
# ingested per second from many simulated workers (vs the same writes straight into Postgres),
# and GET job latency idle and under that ingest load. Report in runs/bench-service/report.json.
#
#   scripts/bench_service.sh
#   BENCH_INGEST_WORKERS=32 BENCH_POINTS=500 scripts/bench_service.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench-service}
source scripts/lib/services.sh
ensure_services

echo "==> building the load generator"
cargo build --release --locked -p lathe-cli -p lathe-controller --example ingest_load 2>&1 | tail -1
rm -rf "$DIR" && mkdir -p "$DIR/data/models"
DB=lathe_bench_$(date +%s)
export LATHE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export LATHE_REDIS_PREFIX="lathe-bench-$DB:"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP=$(free_port); GRPC=$(free_port); WORKER_METRICS=$(free_port)

"$LATHE" model init --arch qwen3 --preset tiny --out "$DIR/data/models/tiny-qwen3" >/dev/null
"$LATHE" controller --http-listen 127.0.0.1:$HTTP --grpc-listen 127.0.0.1:$GRPC --data-dir "$DIR/data" \
  >"$DIR/controller.log" 2>&1 &
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
TOKEN=$("$LATHE" admin create-worker --name bench-idle 2>/dev/null)
"$LATHE" worker --controller http://127.0.0.1:$GRPC --token "$TOKEN" --device cpu --threads 1 \
  --models-root "$DIR/data/models" --metrics-listen 127.0.0.1:$WORKER_METRICS >"$DIR/worker.log" 2>&1 &
WORKER=$!
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)

.venv/bin/python bench/service_bench.py --http-port "$HTTP" --grpc "http://127.0.0.1:$GRPC" \
  --database-url "$LATHE_DATABASE_URL" --api-key "$KEY" --training-file examples/cve-cwe/train.jsonl \
  --load-bin target/release/examples/ingest_load --worker-metrics "http://127.0.0.1:$WORKER_METRICS/metrics" \
  --claim-samples "${BENCH_CLAIM_SAMPLES:-100}" --ingest-workers "${BENCH_INGEST_WORKERS:-16}" \
  --batches "${BENCH_BATCHES:-100}" --points "${BENCH_POINTS:-250}" --out "$DIR/report.json"
