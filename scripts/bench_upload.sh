#!/usr/bin/env bash
# Upload memory: starts a controller on a fresh database and sends concurrent large uploads,
# sampling the controller's RSS (bench/upload_bench.py). Report in runs/bench-upload/report.json.
#
#   scripts/bench_upload.sh                                   # 4 x 500 MB
#   BENCH_UPLOADS=2 BENCH_UPLOAD_MB=100 scripts/bench_upload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
CONTROLLER_BIN=${LATHE_CONTROLLER_BIN:-$(dirname "$LATHE")/lathe-controller}
DIR=${BENCH_DIR:-$ROOT/runs/bench-upload}
UPLOADS=${BENCH_UPLOADS:-4}
MB=${BENCH_UPLOAD_MB:-500}
source scripts/lib/services.sh
ensure_services

rm -rf "$DIR" && mkdir -p "$DIR/data/models"
DB=lathe_bench_upload_$(date +%s)
export LATHE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export LATHE_REDIS_PREFIX="lathe-bench-$DB:"
HTTP=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
GRPC=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$CONTROLLER_BIN" --http-listen 127.0.0.1:$HTTP --grpc-listen 127.0.0.1:$GRPC --data-dir "$DIR/data" \
  --max-upload-bytes $(( (MB + 16) * 1024 * 1024 )) >"$DIR/controller.log" 2>&1 &
CONTROLLER=$!
cleanup() {
  kill -TERM $CONTROLLER 2>/dev/null || true
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$HTTP/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.3
done
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)
.venv/bin/python bench/upload_bench.py --http-port "$HTTP" --api-key "$KEY" --controller-pid "$CONTROLLER" \
  --row-file examples/cve-cwe/train.jsonl --uploads "$UPLOADS" --megabytes "$MB" --out "$DIR/report.json"
