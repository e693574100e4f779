# Sourced by the benchmarks that run the service (bench_service.sh, bench_upload.sh,
# bench_serve.sh): a controller on a fresh database and Redis prefix, on free ports, stopped
# (with every process in BENCH_PIDS), its database dropped and its Redis keys deleted when the
# script exits.

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

BENCH_PIDS=()

# start_bench_controller NAME BIN DATA_DIR LOG [subcommand and flags...]: runs `BIN ARGS
# --http-listen … --grpc-listen … --data-dir DATA_DIR`; sets DB, HTTP, GRPC and CONTROLLER,
# exports LATHE_DATABASE_URL and LATHE_REDIS_PREFIX, and waits for /readyz.
start_bench_controller() {
  local name=$1 bin=$2 data=$3 log=$4
  shift 4
  DB=lathe_bench_${name}_$(date +%s)
  export LATHE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
  export LATHE_REDIS_PREFIX="lathe-bench-$DB:"
  HTTP=$(free_port)
  GRPC=$(free_port)
  "$bin" "$@" --http-listen 127.0.0.1:$HTTP --grpc-listen 127.0.0.1:$GRPC --data-dir "$data" >"$log" 2>&1 &
  CONTROLLER=$!
  trap stop_bench_service EXIT
  for _ in $(seq 1 100); do
    .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$HTTP/readyz', timeout=1)" 2>/dev/null && return 0
    kill -0 "$CONTROLLER" 2>/dev/null || { echo "the controller exited; see $log" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.3
  done
  echo "the controller did not become ready; see $log" >&2
  exit 1
}

stop_bench_service() {
  kill -TERM "${BENCH_PIDS[@]}" "$CONTROLLER" 2>/dev/null || true
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null || true
  # The run's Redis keys too (its queues), which nothing else reads.
  redis-cli -h 127.0.0.1 --scan --pattern "${LATHE_REDIS_PREFIX}*" 2>/dev/null | xargs -r redis-cli -h 127.0.0.1 DEL >/dev/null || true
}
