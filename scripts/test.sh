#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit + integration) and the Python interop suite that
# checks Lathe against transformers + peft. Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || [ ! -f .cargo/config.toml ]; then
  echo "test: the project is not set up; run scripts/setup.sh first" >&2
  exit 1
fi

# Postgres and Redis back the service crates' tests. Start local servers that are installed
# but stopped; fail with a clear message when they are missing.
ensure_services() {
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
      echo "test: starting PostgreSQL"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    else
      echo "test: PostgreSQL is not running on 127.0.0.1:5432 and is not installed (apt-get install postgresql)" >&2
      exit 1
    fi
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null; then
      echo "test: starting Redis"
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
      sleep 1
    else
      echo "test: Redis is not running on 127.0.0.1:6379 and is not installed (apt-get install redis-server)" >&2
      exit 1
    fi
  fi
}
if [ -d services/store ] || [ -d services/queue ] || [ -d services/controller ]; then
  ensure_services
fi

echo "==> Rust tests"
# Release profile: shares its build with the `lathe` binary that the interop tests run.
cargo test --release --locked --workspace

echo "==> Python interop tests (transformers, peft)"
# The interop suite drives the real binary: make sure it is the one just tested.
cargo build --release --locked -p lathe-cli
export LATHE_BIN="$PWD/target/release/lathe"
.venv/bin/python -m pytest tests/interop -q
