# Sourced by scripts/test.sh and scripts/demo.sh: make sure Postgres and Redis answer on
# localhost. Starts local servers that are installed but stopped; fails with a clear message
# when they are missing. Point LATHE_DATABASE_URL / LATHE_REDIS_URL elsewhere to skip this.
ensure_services() {
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
      echo "==> starting PostgreSQL"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    else
      echo "PostgreSQL is not running on 127.0.0.1:5432 and is not installed (apt-get install postgresql, or set LATHE_DATABASE_URL)" >&2
      exit 1
    fi
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null; then
      echo "==> starting Redis"
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
      sleep 1
    else
      echo "Redis is not running on 127.0.0.1:6379 and is not installed (apt-get install redis-server, or set LATHE_REDIS_URL)" >&2
      exit 1
    fi
  fi
}
