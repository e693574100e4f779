# Sourced by scripts/test.sh: a PostgreSQL server of the service suite's own for the length of
# the run (initdb in a temporary folder, a free port, max_connections 300, stopped and removed on
# exit), exported as LATHE_TEST_PG_PORT. The suite's controllers, admin commands and psql calls
# then cannot be refused because something else holds the machine's server's connections (a
# landing failed on "sorry, too many clients already"), and the suite leaves nothing there.
# Needs the PostgreSQL server binaries (apt-get install postgresql); the machine's server is not
# touched.
start_test_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "test: no PostgreSQL server binaries under /usr/lib/postgresql for the service suite's own server (apt-get install postgresql)" >&2
    return 1
  fi
  TEST_PG_DIR=$(mktemp -d /tmp/lathe-test-pg.XXXXXX)  # /tmp: the postgres user can reach it
  local as=()
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root.
    chown postgres "$TEST_PG_DIR"
    as=(runuser -u postgres --)
  fi
  TEST_PG_CTL=("${as[@]}" "$bin/pg_ctl" -D "$TEST_PG_DIR/data")
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # Run from its own folder: the postgres user may not enter the caller's working directory.
  cd "$TEST_PG_DIR"
  if ! "${as[@]}" "$bin/initdb" -D "$TEST_PG_DIR/data" -A trust -U postgres > "$TEST_PG_DIR/initdb.log" 2>&1; then
    echo "test: initdb failed for the service suite's Postgres:" >&2
    cat "$TEST_PG_DIR/initdb.log" >&2
    return 1
  fi
  # fsync off: the data lives for one run, and durability is the store tests' subject, not this.
  cat >> "$TEST_PG_DIR/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TEST_PG_DIR'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  if ! "${TEST_PG_CTL[@]}" -l "$TEST_PG_DIR/server.log" -w -t 60 start > /dev/null; then
    echo "test: the service suite's Postgres did not start:" >&2
    tail -n 20 "$TEST_PG_DIR/server.log" >&2
    return 1
  fi
  cd - > /dev/null
  export LATHE_TEST_PG_PORT=$port
  trap stop_test_postgres EXIT
  echo "==> the service suite's own PostgreSQL on 127.0.0.1:$port ($TEST_PG_DIR)"
}

stop_test_postgres() {
  [ -n "${TEST_PG_DIR:-}" ] || return 0
  (cd "$TEST_PG_DIR" && "${TEST_PG_CTL[@]}" -m immediate stop > /dev/null 2>&1) || true
  rm -rf "$TEST_PG_DIR"
  TEST_PG_DIR=
}
