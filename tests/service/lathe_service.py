"""The service under test: real `lathe controller` and `lathe worker` processes on Postgres and Redis.

`Service` starts the processes on free ports with a database and a Redis key prefix of their own,
keeps every process's output in a log file, and offers the few side doors the tests need to check
what a user cannot see through the API: `psql` for the attempts table, `redis-cli` for FLUSHALL.
The job helpers below are what a user of the OpenAI SDK would write: create, poll, read the curve.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
# CTIBench, read in place (CC BY-NC-SA 4.0: never copied into the project).
CTIBENCH = ROOT.parent / "shared" / "datasets" / "ctibench"
EXAMPLES = ROOT / "examples" / "cve-cwe" / "train.jsonl"

# scripts/test.sh runs the suite on a Postgres of its own (scripts/lib/test_postgres.sh) and says
# where in LATHE_TEST_PG_PORT; without it, the machine's server on 5432.
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", int(os.environ.get("LATHE_TEST_PG_PORT") or 5432), "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

MODEL = "tiny-qwen3"
TERMINAL = {"succeeded", "failed", "cancelled"}
# Extensions in the body (SDK extra_body); tiny and fast on CPU.
JOB_EXTENSIONS = {"learning_rate": 5e-3, "max_seq_length": 256, "packing": True}
BATCH_SIZE = 4
# Enough epochs over the 24-row file that a job is still running when a test interrupts it.
LONG_EPOCHS = 4
# A pool no worker serves: a job created there stays queued until a test cancels it.
PARKED_POOL = "parked"
CHECKPOINT_EVERY = 2
LEASE_SECONDS = 8
UPLOAD_LIMIT_BYTES = 2_000_000
# Each controller's Postgres pool; the suite runs at most four controllers at once.
CONTROLLER_DB_CONNECTIONS = 6
MIN_FREE_DB_CONNECTIONS = 40


# ---------------------------------------------------------------------------------------------
# the binary and the infrastructure


def find_lathe_bin() -> Path:
    explicit = os.environ.get("LATHE_BIN")
    candidate = Path(explicit) if explicit else ROOT / "target" / "release" / "lathe"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        pytest.fail(f"lathe binary not found at {candidate}: run scripts/setup.sh or set LATHE_BIN", pytrace=False)
    return candidate


def find_controller_bin(lathe_bin: Path) -> Path:
    """`lathe-controller` (the controller without libtorch) beside the `lathe` binary: what a
    deployment runs, and what these tests measure."""
    candidate = Path(os.environ.get("LATHE_CONTROLLER_BIN") or lathe_bin.with_name("lathe-controller"))
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        pytest.fail(f"lathe-controller not found at {candidate}: run scripts/setup.sh or set LATHE_CONTROLLER_BIN",
                    pytrace=False)
    return candidate


def require_postgres_and_redis():
    for tool in ("psql", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed; the service tests check Postgres and Redis with it", pytrace=False)
    probe = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", "postgres", "-Atc",
                            "SELECT 1"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.fail(f"Postgres is not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {probe.stderr.strip()}",
                    pytrace=False)
    free = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", "postgres", "-At", "-F", "\t", "-c",
                           "SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    if free.isdigit() and int(free) < MIN_FREE_DB_CONNECTIONS:
        pytest.fail(f"Postgres at {PG_HOST}:{PG_PORT} has only {free} free connections (the suite needs about "
                    f"{MIN_FREE_DB_CONNECTIONS}); who holds them:\n{postgres_connection_holders()}", pytrace=False)
    if redis_cli("PING") != "PONG":
        pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}", pytrace=False)


def postgres_connection_holders() -> str:
    """Connections by database and application, most first: what to show when Postgres refuses
    one (a superuser may still take one of its reserved slots to ask)."""
    proc = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", "postgres", "-At", "-F", "\t", "-c",
                           "SELECT count(*), coalesce(datname, '-'), coalesce(nullif(application_name, ''), '-'), state "
                           "FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 2, 3, 4 ORDER BY 1 DESC"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode == 0:
        return proc.stdout
    # Every slot taken (superusers' reserved ones too): the kernel still knows who is connected.
    return f"(pg_stat_activity unreadable: {proc.stderr.strip()})\nconnections to port {PG_PORT} by process:\n{connections_by_process(PG_PORT)}"


def connections_by_process(port: int) -> str:
    """Established TCP connections to `port`, counted by the process holding them (from `ss`)."""
    proc = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"(ss failed: {proc.stderr.strip()})"
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        holder = line.split("users:", 1)[1].strip() if "users:" in line else "(unknown process)"
        holder = holder.split(",fd=")[0] + "))" if ",fd=" in holder else holder
        counts[holder] = counts.get(holder, 0) + 1
    lines = [f"{n}\t{holder}" for holder, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) or "(none)"


def redis_cli(*args: str) -> str:
    proc = subprocess.run(["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"redis-cli {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sql_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def wait_until(probe, timeout: float, what, interval: float = 0.2):
    """Calls `probe` until it returns something truthy and returns that; fails after `timeout`
    with `what` (a string, or a callable giving one, for messages that show the last state)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s: {what() if callable(what) else what}", pytrace=False)
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# processes


class Process:
    """One child process whose stdout and stderr go to files in the log dir."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: Path, log_dir: Path):
        self.name = name
        self.cmd = cmd
        self.stdout_log = log_dir / f"{name}.stdout.log"
        self.stderr_log = log_dir / f"{name}.stderr.log"
        with open(self.stdout_log, "wb") as out, open(self.stderr_log, "wb") as err:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self):
        """SIGKILL, as the OOM killer or a lost node would: no chance to clean up."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self):
        """SIGTERM, as Slurm or Kubernetes sends before preempting."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} (pid {self.pid}) still running {timeout:.0f} s after it was told to stop\n"
                        f"{self.tail()}", pytrace=False)

    def stop(self, grace: float = 15):
        self.terminate()
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        parts = [f"=== {self.name} (pid {self.pid}, {state}): {Path(self.cmd[0]).name} {self.cmd[1]} ==="]
        for path in (self.stderr_log, self.stdout_log):
            text = path.read_text(errors="replace") if path.exists() else ""
            if text.strip():
                parts.append(f"--- {path.name} (last {lines} lines) ---")
                parts.extend(text.splitlines()[-lines:])
        return "\n".join(parts)


@dataclass
class HttpResponse:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


_RUN_SALT = secrets.token_hex(16)


class Service:
    """A controller and its workers, on a database and a Redis prefix no other run uses."""

    def __init__(self, lathe_bin: Path, workdir: Path, pg_port: int = PG_PORT):
        self.bin = lathe_bin
        self.workdir = workdir
        self.data_dir = workdir / "lathe-data"
        self.models_root = self.data_dir / "models"
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(6)
        self.db_name = f"lathe_test_{run_id}"
        self.redis_prefix = f"lathe-test-{run_id}:"
        self.env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1",
                        LATHE_DATABASE_URL=f"postgres://{PG_USER}@{PG_HOST}:{pg_port}/{self.db_name}",
                        LATHE_REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}",
                        LATHE_REDIS_PREFIX=self.redis_prefix)
        self.env.setdefault("RUST_LOG", "info,sqlx=warn")
        self.env.pop("LATHE_WORKER_TOKEN", None)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.controller: Process | None = None
        self.workers: list[Process] = []
        # Other processes of a test (an autoscaler): their logs join a failure's report.
        self.others: list[Process] = []
        # The controller checks evaluations against this CTIBench directory.
        self.eval_data_dir: Path = CTIBENCH

    # The admin endpoints (/v1/admin/…) and fleet enrolment are on for every controller of the
    # suite. Their secrets follow the database: a second controller on the same one (a replica, a
    # differently configured sibling) shares them, as replicas must (another --fleet-secret
    # would rotate the fleet's).
    def _secret(self, kind: str) -> str:
        return f"{kind}-" + hashlib.sha256(f"{_RUN_SALT}:{kind}:{self.env['LATHE_DATABASE_URL']}".encode()).hexdigest()[:32]

    @property
    def admin_token(self) -> str:
        return self._secret("admin")

    @property
    def fleet_secret(self) -> str:
        return self._secret("fleet")

    # -- commands -----------------------------------------------------------------------------

    def lathe(self, *args, timeout: float = 300) -> str:
        """Runs a one-shot `lathe` command (model init, admin …) and returns its stdout, stripped."""
        cmd = [str(self.bin), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.workdir)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
                        f"\n--- stderr ---\n{proc.stderr[-3000:]}", pytrace=False)
        return proc.stdout.strip()

    def init_model(self, name: str = MODEL) -> Path:
        out = self.models_root / name
        self.lathe("model", "init", "--arch", "qwen3", "--preset", "tiny", "--seed", 0, "--out", out)
        assert (out / "config.json").is_file(), f"`lathe model init` wrote no config.json in {out}"
        return out

    def create_key(self, project: str, name: str = "tests") -> str:
        key = self.lathe("admin", "create-key", "--project", project, "--name", name)
        assert key.startswith("lathe-sk-") and len(key.split()) == 1, f"create-key printed {key!r}, not a key alone"
        return key

    # -- processes ----------------------------------------------------------------------------

    def start_controller(self, ready_timeout: float = 60, extra_args: tuple[str, ...] = (),
                         max_upload_bytes: int = UPLOAD_LIMIT_BYTES, lease_seconds: float = LEASE_SECONDS):
        self.controller = Process("controller", [
            str(find_controller_bin(self.bin)),
            "--http-listen", f"127.0.0.1:{self.http_port}", "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
            "--data-dir", str(self.data_dir), "--models-root", str(self.models_root),
            "--lease-seconds", str(lease_seconds), "--heartbeat-seconds", "1", "--reconcile-seconds", "1",
            "--max-upload-bytes", str(max_upload_bytes), "--eval-data-dir", str(self.eval_data_dir),
            "--admin-token", self.admin_token, "--fleet-secret", self.fleet_secret,
            # A few controllers live at once on a Postgres other suites may share: a small pool
            # each keeps the suite far below the server's max_connections.
            "--database-max-connections", str(CONTROLLER_DB_CONNECTIONS),
            *(extra_args or (
                # The suite's clients are scripted, not users: far above the default per-key
                # limits (test_limits.py checks the limits on controllers of their own).
                "--rate-limit-per-minute", "100000", "--auth-failures-per-minute", "100000")),
        ], self.env, self.workdir, self.log_dir)

        def ready():
            if not self.controller.alive():
                pytest.fail(f"the controller exited with {self.controller.popen.returncode} before it was ready\n"
                            f"{self.controller.tail(80)}", pytrace=False)
            try:
                return self.request("GET", "/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_until(ready, ready_timeout, lambda: f"GET /readyz never answered 200\n{self.controller.tail(80)}")

    def start_worker(self, grpc_port: int | None = None, pools: str = "default", scheme: str = "http",
                     extra_args: tuple[str, ...] = (), token: str | None = None) -> Process:
        """A worker process; `grpc_port` reaches the controller some other way (a proxy). Its token
        is minted for it (`lathe admin create-worker`) unless given (e.g. the fleet secret)."""
        name = f"worker-{len(self.workers) + 1}"
        # The session's kind of worker: straight to this controller, default pool, own token.
        plain = grpc_port is None and scheme == "http" and pools == "default" and not extra_args and token is None
        if token is None:
            roles = "serving" if "--serve" in extra_args else "training"
            token = self.lathe("admin", "create-worker", "--name", name, "--roles", roles)
            assert token and len(token.split()) == 1, f"create-worker printed {token!r}, not a token alone"
        worker = Process(name, [
            str(self.bin), "worker", "--controller", f"{scheme}://127.0.0.1:{grpc_port or self.grpc_port}", "--token", token,
            "--name", name, "--device", "cpu", "--threads", "1", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--models-root", str(self.models_root), "--eval-data-dir", str(CTIBENCH), "--pools", pools, *extra_args,
        ], self.env, self.workdir, self.log_dir)
        worker.plain = plain
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Process]:
        """Training workers alive (an inference worker a module keeps, `keep`, is not one)."""
        return [w for w in self.workers if w.alive() and not getattr(w, "keep", False)]

    def only_worker(self) -> Process:
        live = self.live_workers()
        assert len(live) == 1, f"expected exactly one live worker, found {[w.name for w in live]}"
        return live[0]

    def ensure_one_worker(self):
        """One plain worker (see start_worker) and no other: a worker a test left behind may talk
        through a proxy it has cut, or serve another pool."""
        live = self.live_workers()
        keep = next((w for w in live if getattr(w, "plain", False)), None)
        for extra in live:
            if extra is not keep:
                extra.stop()
        if keep is None:
            self.start_worker()

    def shutdown(self):
        for process in [*(w for w in self.workers if w.alive()), self.controller]:
            if process is not None and process.alive():
                process.stop()
        if os.environ.get("LATHE_TEST_KEEP"):
            print(f"kept database {self.db_name}, Redis prefix {self.redis_prefix}, logs in {self.log_dir}")
            return
        subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", "postgres", "-Atc",
                        f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'],
                       capture_output=True, text=True, timeout=60)
        keys = redis_cli("--scan", "--pattern", f"{self.redis_prefix}*").split()
        for start in range(0, len(keys), 500):
            redis_cli("DEL", *keys[start:start + 500])

    def worker_env(self) -> dict:
        """What a worker started outside this harness (a Slurm pilot) needs in its environment."""
        return dict(self.env, LATHE_CONTROLLER=f"http://127.0.0.1:{self.grpc_port}", LATHE_WORKER_TOKEN=self.fleet_secret,
                    LATHE_MODELS_ROOT=str(self.models_root), LATHE_DEVICE="cpu", LATHE_THREADS="1",
                    LATHE_CHECKPOINT_EVERY=str(CHECKPOINT_EVERY), LATHE_BIN=str(self.bin))

    def admin(self, path: str):
        """GET /v1/admin/<path> with the admin token; the JSON answer."""
        resp = self.request("GET", f"/v1/admin/{path}", key=self.admin_token)
        assert resp.status == 200, f"GET /v1/admin/{path} answered {resp.status}: {resp.body[:300]!r}"
        return resp.json()

    def processes(self) -> list[Process]:
        return [p for p in [self.controller, *self.workers, *self.others] if p is not None]

    def log_tails(self, lines: int = 40) -> str:
        return "\n\n".join(p.tail(lines) for p in self.processes()) + f"\n\n(full logs in {self.log_dir})"

    # -- side doors ---------------------------------------------------------------------------

    def psql(self, sql: str) -> list[list[str | None]]:
        """Rows of a query on the service's database; NULL comes back as None."""
        proc = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", self.db_name,
                               "-At", "-F", "\t", "-P", "null=<NULL>", "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 and "too many clients" in proc.stderr:
            pytest.fail(f"Postgres refused psql on {sql!r}: {proc.stderr.strip()}\nwho holds its connections:\n"
                        f"{postgres_connection_holders()}", pytrace=False)
        assert proc.returncode == 0, f"psql failed on {sql!r}: {proc.stderr}"
        return [[None if v == "<NULL>" else v for v in line.split("\t")] for line in proc.stdout.splitlines()]

    def attempts(self, job_id: str) -> list[dict]:
        rows = self.psql("SELECT number, worker_id, resumed_from_step, outcome, started_at, ended_at "
                         f"FROM attempts WHERE job_id = {sql_literal(job_id)} ORDER BY number")
        return [{"number": int(n), "worker_id": w, "resumed_from_step": None if r is None else int(r),
                 "outcome": o, "started_at": s, "ended_at": e} for n, w, r, o, s, e in rows]

    def assert_attempts_never_overlap(self, job_id: str):
        """No two attempts of the job were live at once: their [started_at, ended_at] never intersect."""
        overlaps = self.psql(
            "SELECT a.number, b.number FROM attempts a JOIN attempts b ON a.job_id = b.job_id AND a.number < b.number "
            f"WHERE a.job_id = {sql_literal(job_id)} "
            "AND a.started_at < COALESCE(b.ended_at, 'infinity') AND b.started_at < COALESCE(a.ended_at, 'infinity')")
        assert not overlaps, f"attempts {overlaps} of {job_id} ran at the same time: {self.attempts(job_id)}"

    def job_column(self, job_id: str, column: str) -> str | None:
        rows = self.psql(f"SELECT {column} FROM jobs WHERE id = {sql_literal(job_id)}")
        assert rows, f"no row for {job_id} in jobs"
        return rows[0][0]

    def checkpoint_steps(self, job_id: str, attempt: int) -> list[int]:
        rows = self.psql(f"SELECT step FROM checkpoints WHERE job_id = {sql_literal(job_id)} "
                         f"AND attempt = {int(attempt)} ORDER BY step")
        return [int(r[0]) for r in rows]

    # -- HTTP without the SDK -----------------------------------------------------------------

    @property
    def v1_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def request(self, method: str, path: str, *, key: str | None = None, json_body=None, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 30) -> HttpResponse:
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return HttpResponse(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# training files


def example_rows(n: int) -> list[str]:
    rows = [line for line in EXAMPLES.read_text().splitlines() if line.strip()]
    assert len(rows) >= n, f"{EXAMPLES} has {len(rows)} rows, {n} wanted"
    return rows[:n]


REFUSALS = ["I cannot tell which weakness this is.", "Not enough information to map this CVE.",
            "Unknown."]


def preference_rows(chat_rows: list[str]) -> list[str]:
    """Each CVE question with its analyst answer preferred over a refusal (OpenAI's DPO format)."""
    rows = []
    for i, line in enumerate(chat_rows):
        messages = json.loads(line)["messages"]
        rows.append(json.dumps({
            "input": {"messages": messages[:-1]},
            "preferred_output": [messages[-1]],
            "non_preferred_output": [{"role": "assistant", "content": REFUSALS[i % len(REFUSALS)]}],
        }))
    return rows


def write_jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows))
    return path


def multipart_upload_body(filename: str, content: bytes, purpose: str = "fine-tune") -> tuple[str, bytes]:
    boundary = f"lathe-test-{secrets.token_hex(8)}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def post_large_upload(service: Service, key: str, filename: str, content: bytes, timeout: float = 60) -> int:
    """POST /v1/files the way curl sends a large body: headers with `Expect: 100-continue`, and the
    body only once the server asks for it (or after 3 s of silence). A server that refuses the size
    from Content-Length answers before a byte of the body is sent; one that counts while reading
    answers mid-body. Returns the final HTTP status."""
    content_type, body = multipart_upload_body(filename, content)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{service.http_port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=timeout) as sock:
        reader = _StatusReader(sock)
        sock.sendall(head)
        status = reader.next_status(wait=3.0)
        if status in (None, 100):
            try:
                sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed mid-body; its answer is still to be read
            status = reader.next_status(wait=timeout)
            while status == 100:
                status = reader.next_status(wait=timeout)
        assert status is not None, "the server sent no HTTP status for an oversized upload"
        return status


def stream_upload(port: int, key: str, filename: str, row: bytes, total_bytes: int, timeout: float = 600) -> tuple[int, bytes]:
    """POST /v1/files with a file of `row` repeated to about `total_bytes`, generated while it is
    sent (the client never holds the file). Returns the status and the response body."""
    boundary = f"lathe-stream-{secrets.token_hex(8)}"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    rows_per_chunk = max(1, (1 << 20) // len(row))
    chunks = max(1, total_bytes // (rows_per_chunk * len(row)))
    chunk = row * rows_per_chunk

    def body():
        yield head
        for _ in range(chunks):
            yield chunk
        yield tail

    length = len(head) + chunks * len(chunk) + len(tail)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/files", body=body(), headers={
            "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(length)})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def peak_rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = lambda name: int(fields[name].split()[0]) * 1024
    return kib("VmRSS"), kib("VmHWM")


class _StatusReader:
    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def next_status(self, wait: float) -> int | None:
        """Status code of the next response head (interim ones included), or None on silence."""
        deadline = time.monotonic() + wait
        while b"\r\n\r\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                pytest.fail("the controller reset the connection instead of answering the oversized upload "
                            "(answer 413 before reading the body, e.g. from Content-Length)", pytrace=False)
            if not chunk:
                return None if not self.buffer else int(self.buffer.split(b" ", 2)[1])
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        if status >= 200:
            self.buffer = b""  # the final response: its body does not matter here
        return status


# ---------------------------------------------------------------------------------------------
# jobs, as an SDK user drives them


def make_client(service: Service, key: str) -> openai.OpenAI:
    """The SDK as a user sets it up; no retries, so every 5xx or timeout shows."""
    return openai.OpenAI(base_url=service.v1_url, api_key=key, max_retries=0, timeout=60)


def create_job(client, training_file: str, *, n_epochs: int = 1, seed: int = 0, suffix: str | None = None,
               pool: str | None = None, extra: dict | None = None, batch_size: int | None = None, **options):
    """A tiny LoRA job on the tiny model; `extra` adds body extensions (priority, gpu_memory_gb …),
    `options` go to jobs.create (extra_headers, …)."""
    body = dict(JOB_EXTENSIONS, **(extra or {}))
    if pool is not None:
        body["pool"] = pool
    if suffix is not None:
        options["suffix"] = suffix
    return client.fine_tuning.jobs.create(
        model=MODEL, training_file=training_file, seed=seed,
        hyperparameters={"n_epochs": n_epochs, "batch_size": batch_size or BATCH_SIZE}, extra_body=body, **options)


def download_result_files(client, job, directory: Path) -> Path:
    """Writes a finished job's result files (adapter, step_metrics.csv) into `directory`, by their names."""
    directory.mkdir(parents=True, exist_ok=True)
    for file_id in job.result_files:
        (directory / client.files.retrieve(file_id).filename).write_bytes(client.files.content(file_id).read())
    return directory


def wait_for_status(client, job_id: str, wanted, timeout: float = 180, interval: float = 0.25):
    """Polls the job until its status is in `wanted`; fails at once if it ends in another state."""
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    last = {}

    def probe():
        job = client.fine_tuning.jobs.retrieve(job_id)
        last["job"] = job
        if job.status in wanted:
            return job
        if job.status in TERMINAL:
            pytest.fail(f"job {job_id} ended {job.status} (error {job.error}) while waiting for {sorted(wanted)}",
                        pytrace=False)
        return None

    return wait_until(probe, timeout, lambda: f"job {job_id} still {last['job'].status}, wanted {sorted(wanted)}",
                      interval)


def metrics_curve(service: Service, key: str, job_id: str) -> list[dict]:
    """The native GET …/{id}/metrics: one point per optimizer step."""
    resp = service.request("GET", f"/v1/fine_tuning/jobs/{job_id}/metrics", key=key)
    assert resp.status == 200, f"GET …/{job_id}/metrics answered {resp.status}: {resp.body[:500]!r}"
    payload = resp.json()
    assert payload.get("object") == "list", f"metrics of {job_id}: {str(payload)[:300]}"
    return payload["data"]


def wait_for_step(service: Service, client, key: str, job_id: str, step: int, timeout: float = 120) -> int:
    """Waits until the job has reported `step` (training is under way); returns the last step seen."""
    def probe():
        curve = metrics_curve(service, key, job_id)
        if curve and max(p["step"] for p in curve) >= step:
            return max(p["step"] for p in curve)
        status = client.fine_tuning.jobs.retrieve(job_id).status
        if status in TERMINAL:
            pytest.fail(f"job {job_id} ended {status} before reporting step {step}", pytrace=False)
        return None

    return wait_until(probe, timeout, f"job {job_id} never reported step {step}", interval=0.1)


def assert_complete_curve(curve: list[dict], job_id: str) -> int:
    """Every step 1..N exactly once, in order, each with a finite train loss; returns N."""
    steps = [p["step"] for p in curve]
    assert curve, f"job {job_id} has no metric points"
    total = curve[-1].get("total_steps") or steps[-1]
    assert steps == list(range(1, total + 1)), f"job {job_id}: steps {steps} are not 1..{total} once each"
    assert {p.get("total_steps") for p in curve} == {total}, f"job {job_id}: total_steps changes along the curve"
    for p in curve:
        loss = p.get("train_loss")
        assert isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf"), \
            f"job {job_id} step {p['step']}: train_loss {loss!r}"
    return total


def list_all(page, cap: int = 5000) -> list:
    """Every item of an SDK list, following pages; fails if an item comes twice (a broken cursor)."""
    items, seen = [], set()
    for item in page:
        assert item.id not in seen, f"pagination returned {item.id} twice"
        seen.add(item.id)
        items.append(item)
        assert len(items) <= cap, f"pagination did not stop after {cap} items"
    return items


def error_body(exc) -> dict:
    """The `error` object of an openai.APIStatusError (the SDK unwraps the envelope into .body)."""
    assert isinstance(exc.body, dict), f"the error body is not the JSON envelope: {exc.body!r}"
    return exc.body


def cancel_unfinished_evaluations(service: Service, keys):
    """Cancels every queued or running evaluation of these projects, so the next test finds an
    idle worker (a worker takes evaluations before waiting for jobs)."""
    for key in keys:
        resp = service.request("GET", "/v1/evaluations?limit=100", key=key)
        for evaluation in resp.json()["data"] if resp.status == 200 else []:
            if evaluation["status"] not in TERMINAL:
                service.request("POST", f"/v1/evaluations/{evaluation['id']}/cancel", key=key)


def cancel_unfinished_jobs(clients, timeout: float = 60):
    """Cancels every job of these projects that is not finished and waits until they are, so the
    next test finds an idle worker and an empty queue."""
    pending = []
    for client in clients:
        for job in list_all(client.fine_tuning.jobs.list(limit=100)):
            if job.status not in TERMINAL:
                try:
                    client.fine_tuning.jobs.cancel(job.id)
                except openai.APIStatusError:
                    pass  # it finished in between
                pending.append((client, job.id))
    for client, job_id in pending:
        wait_until(lambda: client.fine_tuning.jobs.retrieve(job_id).status in TERMINAL, timeout,
                   f"job {job_id} did not stop after cancel")
