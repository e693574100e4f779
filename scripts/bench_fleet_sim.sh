#!/usr/bin/env bash
# The control plane at scale: two controller replicas on one Postgres, N simulated workers
# speaking the real gRPC protocol and M jobs over three projects (weights 3:1:1) and two pools
# (bench/fleet_sim.py; docs/scheduling.md "The control plane at scale" reads the figures).
# Report in runs/bench-fleet-sim/report.json; exits non-zero if a job was lost or finished twice.
#
#   scripts/bench_fleet_sim.sh                          # N=1000 workers, M=10000 jobs
#   SIM_WORKERS=100 SIM_JOBS=1000 scripts/bench_fleet_sim.sh
#   SIM_SERIES="100 300 1000" scripts/bench_fleet_sim.sh    # one run per N, M = 10 × N; a table at the end
#   SIM_ARGS="--crash-rate 0.05 --job-seconds 10:30" scripts/bench_fleet_sim.sh   # more of bench/fleet_sim.py's flags
#   LATHE_BIN=… LATHE_CONTROLLER_BIN=… FLEET_SIM_BIN=… scripts/bench_fleet_sim.sh   # built elsewhere: no cargo build
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${BENCH_DIR:-$ROOT/runs/bench-fleet-sim}
source scripts/lib/services.sh
ensure_services

if [ -z "${LATHE_BIN:-}" ] || [ -z "${LATHE_CONTROLLER_BIN:-}" ] || [ -z "${FLEET_SIM_BIN:-}" ]; then
  echo "==> building the controller and the fleet simulator"
  cargo build --release --locked -p lathe-cli -p lathe-controller --bins --example fleet_sim 2>&1 | tail -1
fi
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
CONTROLLER=${LATHE_CONTROLLER_BIN:-$ROOT/target/release/lathe-controller}
SIM=${FLEET_SIM_BIN:-$ROOT/target/release/examples/fleet_sim}
# Every simulated worker holds a gRPC and a Redis connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

run_one() {
  local workers=$1 jobs=$2 dir=$3
  rm -rf "$dir" && mkdir -p "$dir"
  # shellcheck disable=SC2086
  .venv/bin/python bench/fleet_sim.py --workers "$workers" --jobs "$jobs" \
    --lathe-bin "$LATHE" --controller-bin "$CONTROLLER" --sim-bin "$SIM" \
    --dir "$dir" --out "$dir/report.json" ${SIM_ARGS:-}
}

if [ -n "${SIM_SERIES:-}" ]; then
  status=0
  for n in $SIM_SERIES; do
    echo "=== N=$n workers, M=$((10 * n)) jobs"
    run_one "$n" $((10 * n)) "$DIR/n$n" || status=1
  done
  .venv/bin/python - "$DIR" $SIM_SERIES <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads((Path(sys.argv[1]) / f"n{n}" / "report.json").read_text()) for n in sys.argv[2:]
        if (Path(sys.argv[1]) / f"n{n}" / "report.json").exists()]
print("\n  N      M       lost  twice  idle q→c p50/p99 ms  refill p99 ms  claim p99 ms  heartbeat p99 ms  points/s  reconciler mean ms  ctrl CPU s  PG conns  worst share")
for r in rows:
    i = r["idle_fleet_queued_to_claimed_ms"]
    print(f"  {r['workers']:<6} {r['jobs']:<7} {r['jobs_lost']:<5} {r['jobs_finished_twice']:<6} "
          f"{i.get('p50')}/{i.get('p99'):<14} {r['backlog_free_worker_refill_ms'].get('p99'):<14} {r['claim_rpc_ms'].get('p99'):<13} "
          f"{r['heartbeat_rpc_ms'].get('p99'):<17} {r['metric_points_per_second']:<9} "
          f"{'/'.join(str(v.get('leader', {}).get('mean_ms', '-')) for v in r['reconciler_pass'].values()):<19} "
          f"{'+'.join(str(c) for c in r['controller_cpu_seconds'].values()):<11} {r['postgres_connections_max']:<9} {r['shares_worst_off_by']}")
Path(sys.argv[1], "series.json").write_text(json.dumps(rows, indent=2))
EOF
  exit $status
fi
run_one "${SIM_WORKERS:-1000}" "${SIM_JOBS:-10000}" "$DIR"
