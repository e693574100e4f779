#!/usr/bin/env bash
# The service benchmark: starts a controller and one idle worker on
# a fresh database, then runs bench/service_bench.py — submit-to-claimed latency, metric points
# ingested per second from many simulated workers (vs the same writes straight into Postgres),
# and GET job latency idle and under that ingest load. Report in runs/bench-service/report.json.
#
#   scripts/bench_service.sh
#   BENCH_INGEST_WORKERS=32 BENCH_POINTS=500 scripts/bench_service.sh
#   LATHE_BIN=… LATHE_INGEST_LOAD=… scripts/bench_service.sh   # binaries built elsewhere: no cargo build
#   BENCH_INGEST=0 scripts/bench_service.sh     # claim and GET latency only: no load generator built
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench-service}
source scripts/lib/services.sh
ensure_services

INGEST_LOAD=${LATHE_INGEST_LOAD:-}
if [ "${BENCH_INGEST:-1}" = 0 ]; then
  INGEST_LOAD=
elif [ -z "$INGEST_LOAD" ]; then
  echo "==> building the load generator"
  cargo build --release --locked -p lathe-cli -p lathe-controller --bins --example ingest_load 2>&1 | tail -1
  INGEST_LOAD=target/release/examples/ingest_load
fi
rm -rf "$DIR" && mkdir -p "$DIR/data/models"
source scripts/lib/bench_service.sh
"$LATHE" model init --arch qwen3 --preset tiny --out "$DIR/data/models/tiny-qwen3" >/dev/null
# No per-key rate limit: the GET latency loops send far more than the default allows a key.
start_bench_controller service "$LATHE" "$DIR/data" "$DIR/controller.log" controller --rate-limit-per-minute 0
WORKER_METRICS=$(free_port)
TOKEN=$("$LATHE" admin create-worker --name bench-idle 2>/dev/null)
"$LATHE" worker --controller http://127.0.0.1:$GRPC --token "$TOKEN" --device cpu --threads 1 \
  --models-root "$DIR/data/models" --metrics-listen 127.0.0.1:$WORKER_METRICS >"$DIR/worker.log" 2>&1 &
BENCH_PIDS+=($!)
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)

.venv/bin/python bench/service_bench.py --http-port "$HTTP" --grpc "http://127.0.0.1:$GRPC" \
  --database-url "$LATHE_DATABASE_URL" --api-key "$KEY" --training-file examples/cve-cwe/train.jsonl \
  ${INGEST_LOAD:+--load-bin "$INGEST_LOAD"} --worker-metrics "http://127.0.0.1:$WORKER_METRICS/metrics" \
  --claim-samples "${BENCH_CLAIM_SAMPLES:-100}" --ingest-workers "${BENCH_INGEST_WORKERS:-16}" \
  --batches "${BENCH_BATCHES:-100}" --points "${BENCH_POINTS:-250}" --out "$DIR/report.json"
