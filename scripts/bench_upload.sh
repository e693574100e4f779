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
source scripts/lib/bench_service.sh
start_bench_controller upload "$CONTROLLER_BIN" "$DIR/data" "$DIR/controller.log" \
  --max-upload-bytes $(( (MB + 16) * 1024 * 1024 ))
KEY=$("$LATHE" admin create-key --project bench 2>/dev/null)
.venv/bin/python bench/upload_bench.py --http-port "$HTTP" --api-key "$KEY" --controller-pid "$CONTROLLER" \
  --row-file examples/cve-cwe/train.jsonl --uploads "$UPLOADS" --megabytes "$MB" --out "$DIR/report.json"
