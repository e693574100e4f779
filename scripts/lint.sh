#!/usr/bin/env bash
# Formatting and lints, as CI runs them before the tests: `cargo fmt --check` (rustfmt.toml)
# and clippy on every crate and target with warnings as errors. Run scripts/setup.sh once first
# (clippy compiles against the libtorch it configures).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .cargo/config.toml ] || { echo "lint: the project is not set up; run scripts/setup.sh first" >&2; exit 1; }

echo "==> cargo fmt --check"
cargo fmt --all -- --check || { echo "lint: run \`cargo fmt --all\` and commit the result" >&2; exit 1; }

echo "==> cargo clippy (all crates and targets, warnings are errors)"
cargo clippy --locked --workspace --all-targets -- -D warnings
