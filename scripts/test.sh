#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit + integration) and the Python interop suite that
# checks Lathe against transformers + peft. Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || [ ! -f .cargo/config.toml ]; then
  echo "test: the project is not set up; run scripts/setup.sh first" >&2
  exit 1
fi

# Postgres and Redis back the service crates' tests and the service suite.
source scripts/lib/services.sh
ensure_services

echo "==> Rust tests"
# Release profile: shares its build with the `lathe` binary that the interop tests run.
cargo test --release --locked --workspace

echo "==> Test-only Python packages (scripts/requirements-test.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt

echo "==> Python interop tests (transformers, peft, trl)"
# The interop suite drives the real binary: make sure it is the one just tested.
cargo build --release --locked -p lathe-cli -p lathe-controller
export LATHE_BIN="$PWD/target/release/lathe"
.venv/bin/python -m pytest tests/interop -q

echo "==> Service tests (real controller, workers, Postgres, Redis; the openai SDK)"
# promtool for the alerting-rule tests (test_prometheus_rules.py); only the tests need it.
source scripts/lib/promtool.sh
ensure_promtool
source scripts/lib/test_postgres.sh
start_test_postgres
.venv/bin/python -m pytest tests/service -q
