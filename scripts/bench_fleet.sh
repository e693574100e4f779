#!/usr/bin/env bash
# Slurm autoscaler benchmark: a controller, a real two-node Slurm on this machine (as root; the
# packages come from scripts/setup.sh) and `lathe slurm autoscale` (bench/fleet_bench.py).
# Report in runs/bench-fleet/report.json.
#
#   scripts/bench_fleet.sh                 # 3 runs of queued → first step; calls at 1, 10, 100 jobs
#   BENCH_RUNS=5 scripts/bench_fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LATHE_BIN=${LATHE_BIN:-$PWD/target/release/lathe}
DIR=${BENCH_DIR:-$PWD/runs/bench-fleet}
source scripts/lib/services.sh
ensure_services
rm -rf "$DIR" && mkdir -p "$DIR"
.venv/bin/python bench/fleet_bench.py --out "$DIR/report.json" --runs "${BENCH_RUNS:-3}"
