"""The control plane at scale (run by scripts/bench_fleet_sim.sh; docs/scheduling.md explains the
figures). Two controller replicas on one fresh Postgres database and one Redis prefix, and
services/controller/examples/fleet_sim: N simulated workers speaking the real gRPC protocol
(enrol, heartbeat, wait in Redis, claim, stream metrics, finish; some crash, some are preempted).

1. Backlog: M jobs over several projects (weights set with `lathe admin set-project`) and pools
   are created over REST, interleaved, as fast as the API takes them; a burst of priority-10 jobs
   follows while every worker is busy, so some running jobs are preempted.
2. Idle fleet: once everything has finished, jobs are created one at a time while every worker
   waits: queued→claimed as a user of an idle fleet sees it.

From Postgres (one clock): queued→claimed (attempts.started_at - jobs.created_at, first
attempts), a free worker's refill time (its next attempt's start - its previous one's end, during
the backlog), jobs lost (not succeeded at the end), each project's share of the GPU-seconds in
each pool while every project still had work queued there, against its weight. From the
simulator: claim and heartbeat RPC latency, points acked per second, jobs finished twice. From the
controllers: reconciler pass time (lathe_reconciler_pass_seconds), CPU seconds and peak RSS; from
Postgres, its connections. Writes the report as JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"
TERMINAL = ("succeeded", "failed", "cancelled")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "p50": round(at(0.5), 2), "p90": round(at(0.9), 2), "p99": round(at(0.99), 2), "max": round(v[-1], 2)}


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return f"{model}, {os.cpu_count()} cores, amx_tile={'amx_tile' in flags}, avx512_bf16={'avx512_bf16' in flags}"


class Run:
    """The processes and the database of one run."""

    def __init__(self, args):
        self.args = args
        self.dir = Path(args.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(4)
        self.db = f"lathe_bench_fleet_sim_{run_id}"
        self.admin_token = secrets.token_hex(16)
        self.fleet_secret = secrets.token_hex(16)
        self.env = dict(os.environ, NO_COLOR="1", RUST_LOG="warn",
                        LATHE_DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.db}",
                        LATHE_REDIS_URL="redis://127.0.0.1:6379", LATHE_REDIS_PREFIX=f"lathe-bench-fleet-{run_id}:")
        self.procs: list[subprocess.Popen] = []
        self.controllers: list[tuple[subprocess.Popen, int, int]] = []

    def lathe(self, *argv) -> str:
        out = subprocess.run([self.args.lathe_bin, *map(str, argv)], capture_output=True, text=True, env=self.env)
        if out.returncode != 0:
            raise SystemExit(f"lathe {' '.join(map(str, argv))}: {out.stderr[-2000:]}")
        return out.stdout.strip()

    def psql(self, sql: str) -> list[list[str]]:
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", self.db, "-AtF", "\t", "-c", sql],
                             capture_output=True, text=True, check=True)
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir)
        self.procs.append(proc)
        return proc

    def start_controller(self, name: str):
        http_port, grpc_port = free_port(), free_port()
        proc = self.spawn(name, [
            self.args.controller_bin, "--http-listen", f"127.0.0.1:{http_port}", "--grpc-listen", f"127.0.0.1:{grpc_port}",
            "--data-dir", str(self.dir / "data"), "--models-root", str(self.dir / "data" / "models"),
            "--admin-token", self.admin_token, "--fleet-secret", self.fleet_secret,
            # Scripted clients: no per-key or per-worker call limits, and enrolment as fast as it comes.
            "--rate-limit-per-minute", "0", "--grpc-rate-limit-per-minute", "0", "--enrolments-per-minute", "0",
            "--lease-seconds", str(self.args.lease_seconds), "--heartbeat-seconds", str(self.args.heartbeat_seconds),
            "--preempt-after-seconds", str(self.args.preempt_after_seconds),
            "--database-max-connections", str(self.args.database_connections),
        ])
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"controller {name} exited; see {self.dir / (name + '.log')}")
            try:
                if http_get(http_port, "/readyz")[0] == 200:
                    self.controllers.append((proc, http_port, grpc_port))
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"controller {name} never became ready")

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc",
                        f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'], capture_output=True)
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", self.env["LATHE_REDIS_PREFIX"] + "*"],
                              capture_output=True, text=True).stdout.split()
        if keys:
            subprocess.run(["redis-cli", "DEL", *keys], capture_output=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def post_json(conn: http.client.HTTPConnection, path: str, key: str, body: dict) -> dict:
    conn.request("POST", path, body=json.dumps(body), headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status >= 300:
        raise RuntimeError(f"POST {path}: {resp.status} {payload[:300]!r}")
    return json.loads(payload)


def upload(port: int, key: str, path: Path) -> str:
    boundary = "fleetsimboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/files", body=body, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": f"multipart/form-data; boundary={boundary}"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status >= 300:
        raise SystemExit(f"upload: {resp.status} {payload[:300]!r}")
    return json.loads(payload)["id"]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Once a second: Postgres connections of the run's database, the controllers' RSS."""

    def __init__(self, run: Run):
        super().__init__(daemon=True)
        self.run_, self.stop_ = run, threading.Event()
        self.max_connections, self.max_rss = 0, {}

    def run(self):
        while not self.stop_.wait(1.0):
            try:
                rows = self.run_.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{self.run_.db}'")
                self.max_connections = max(self.max_connections, int(rows[0][0]))
                for proc, port, _ in self.run_.controllers:
                    self.max_rss[port] = max(self.max_rss.get(port, 0), proc_rss_bytes(proc.pid))
            except (OSError, subprocess.CalledProcessError, ValueError):
                pass


def submit(run: Run, jobs: list[dict], keys: dict[str, str], threads: int) -> float:
    """Creates the jobs over REST from `threads` connections spread over the replicas."""
    ports = [port for _, port, _ in run.controllers]
    chunks = [jobs[i::threads] for i in range(threads)]
    errors = []

    def send(i: int, chunk: list[dict]):
        conn = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)], timeout=60)
        for job in chunk:
            try:
                post_json(conn, "/v1/fine_tuning/jobs", keys[job.pop("_project")], job)
            except (RuntimeError, OSError) as error:
                errors.append(str(error))
                conn = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)], timeout=60)

    started = time.time()
    workers = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate(chunks)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise SystemExit(f"{len(errors)} job creations failed, first: {errors[0]}")
    return time.time() - started


def wait_all_terminal(run: Run, deadline: float, what: str):
    last = ""
    while time.time() < deadline:
        rows = run.psql("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
        counts = {s: int(n) for s, n in rows}
        line = " ".join(f"{s}={n}" for s, n in counts.items())
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {what}: {line}", flush=True)
            last = line
        if all(s in TERMINAL for s in counts):
            return True
        time.sleep(2)
    return False


def histogram_from_metrics(text: str, name: str) -> dict:
    """count, sum and the buckets of one histogram in a /metrics page."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            buckets[float("inf") if le == "+Inf" else float(le)] = buckets.get(float("inf") if le == "+Inf" else float(le), 0) + float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count += float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            total += float(line.split()[-1])
    return {"count": count, "sum": total, "buckets": buckets}


def bucket_quantile(h: dict, q: float) -> float | None:
    """The upper bound of the bucket holding quantile q (Prometheus's histogram_quantile, unsmoothed)."""
    if not h["count"]:
        return None
    for le in sorted(h["buckets"]):
        if h["buckets"][le] >= q * h["count"]:
            return le
    return None


def shares(run: Run, weights: dict[str, float], window: tuple[str, str]) -> dict:
    """Each project's GPU-seconds in each pool inside the window, against its weight."""
    start, end = window
    rows = run.psql(f"""
        SELECT j.pool AS pool, p.name,
               sum(extract(epoch FROM least(coalesce(a.ended_at, now()), '{end}'::timestamptz)
                                    - greatest(a.started_at, '{start}'::timestamptz)))
        FROM attempts a JOIN jobs j ON j.id = a.job_id JOIN projects p ON p.id = j.project_id
        WHERE a.started_at < '{end}' AND coalesce(a.ended_at, now()) > '{start}' AND j.priority <> 10
        GROUP BY 1, 2 ORDER BY 1, 2""")
    out: dict[str, dict] = {}
    for pool, project, seconds in rows:
        out.setdefault(pool, {})[project] = float(seconds)
    result = {}
    total_weight = sum(weights.values())
    for pool, used in out.items():
        total = sum(used.values()) or 1.0
        result[pool] = {p: {"gpu_seconds": round(s, 1), "share": round(s / total, 4), "weight_share": round(weights[p] / total_weight, 4),
                            "off_by": round(abs(s / total / (weights[p] / total_weight) - 1), 4)} for p, s in used.items()}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--pools", default="gpu-a,gpu-b")
    ap.add_argument("--projects", default="red:3,blue:1,green:1", help="name:weight,… (weights set with lathe admin set-project)")
    ap.add_argument("--job-seconds", default="20:60", help="a simulated job lasts this long (min:max)")
    ap.add_argument("--metrics-seconds", type=float, default=5.0, help="one metrics batch per worker this often")
    ap.add_argument("--points-per-batch", type=int, default=10)
    ap.add_argument("--crash-rate", type=float, default=0.01, help="fraction of attempts whose worker dies mid-job")
    ap.add_argument("--urgent-jobs", type=int, default=None,
                    help="priority-10 jobs created at once while every worker is busy, more than free up in a reconciler pass [N/4]")
    ap.add_argument("--idle-jobs", type=int, default=100, help="jobs created one by one on the idle fleet at the end")
    ap.add_argument("--lease-seconds", type=float, default=15)
    ap.add_argument("--heartbeat-seconds", type=float, default=5)
    ap.add_argument("--preempt-after-seconds", type=float, default=5)
    ap.add_argument("--database-connections", type=int, default=16, help="--database-max-connections of each controller")
    ap.add_argument("--submit-threads", type=int, default=8)
    ap.add_argument("--deadline-seconds", type=float, default=840)
    ap.add_argument("--lathe-bin", required=True)
    ap.add_argument("--controller-bin", required=True)
    ap.add_argument("--sim-bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pools = args.pools.split(",")
    weights = {name: float(w) for name, w in (p.split(":") for p in args.projects.split(","))}
    urgent = args.urgent_jobs if args.urgent_jobs is not None else max(1, args.workers // 4)

    run = Run(args)
    began = time.time()
    try:
        run.lathe("model", "init", "--arch", "qwen3", "--preset", "tiny", "--seed", "0", "--out", run.dir / "data" / "models" / MODEL)
        run.start_controller("controller-1")
        run.start_controller("controller-2")
        keys = {p: run.lathe("admin", "create-key", "--project", p, "--name", "fleet-sim") for p in weights}
        for p, w in weights.items():
            run.lathe("admin", "set-project", p, "--weight", w)
        port = run.controllers[0][1]
        files = {p: upload(port, keys[p], ROOT / "examples" / "cve-cwe" / "train.jsonl") for p in weights}
        cpu_before = {p: proc_cpu_seconds(proc.pid) for proc, p, _ in run.controllers}

        print(f"==> {args.workers} simulated workers enrolling with two controllers", flush=True)
        sim = run.spawn("fleet-sim", [
            args.sim_bin, "--grpc", ",".join(f"http://127.0.0.1:{g}" for _, _, g in run.controllers),
            "--secret", run.fleet_secret, "--redis-url", run.env["LATHE_REDIS_URL"], "--redis-prefix", run.env["LATHE_REDIS_PREFIX"],
            "--workers", str(args.workers), "--pools", args.pools, "--job-seconds", args.job_seconds,
            "--metrics-seconds", str(args.metrics_seconds), "--points-per-batch", str(args.points_per_batch),
            "--crash-rate", str(args.crash_rate), "--out", str(run.dir / "sim.json"),
        ])
        enrol_started = time.time()
        while int(run.psql("SELECT count(*) FROM workers WHERE left_at IS NULL")[0][0]) < args.workers:
            if sim.poll() is not None:
                raise SystemExit(f"the simulator exited; see {run.dir / 'fleet-sim.log'}")
            time.sleep(0.5)
        enrol_seconds = time.time() - enrol_started
        sampler = Sampler(run)
        sampler.start()

        print(f"==> {args.jobs} jobs over {len(weights)} projects and {len(pools)} pools", flush=True)
        jobs = [{"_project": project, "model": MODEL, "training_file": files[project], "pool": pools[(i // len(weights)) % len(pools)]}
                for i in range(args.jobs) for project in [list(weights)[i % len(weights)]]]
        backlog_start = run.psql("SELECT now()")[0][0]
        submit_seconds = submit(run, jobs, keys, args.submit_threads)
        submitted_at = run.psql("SELECT now()")[0][0]
        print(f"  created in {submit_seconds:.1f} s ({args.jobs / submit_seconds:.0f} jobs/s)", flush=True)
        time.sleep(min(10.0, args.lease_seconds))
        print(f"==> {urgent} priority-10 jobs while every worker is busy", flush=True)
        urgent_jobs = [{"_project": list(weights)[i % len(weights)], "model": MODEL, "training_file": files[list(weights)[i % len(weights)]],
                        "pool": pools[i % len(pools)], "priority": 10} for i in range(urgent)]
        submit(run, urgent_jobs, keys, min(args.submit_threads, urgent))
        finished = wait_all_terminal(run, began + args.deadline_seconds, "backlog")
        backlog_end = run.psql("SELECT now()")[0][0]

        idle_latency = []
        if finished and args.idle_jobs:
            print(f"==> {args.idle_jobs} jobs one at a time on the idle fleet", flush=True)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            project = list(weights)[0]
            ids = []
            for i in range(args.idle_jobs):
                ids.append(post_json(conn, "/v1/fine_tuning/jobs", keys[project],
                                     {"model": MODEL, "training_file": files[project], "pool": pools[i % len(pools)]})["id"])
                time.sleep(0.3)
            finished = wait_all_terminal(run, began + args.deadline_seconds + 120, "idle fleet")
            id_list = ",".join(f"'{i}'" for i in ids)
            idle_latency = [float(ms) for (ms,) in run.psql(
                f"SELECT extract(epoch FROM a.started_at - j.created_at) * 1000 FROM attempts a JOIN jobs j ON j.id = a.job_id "
                f"WHERE a.number = 1 AND j.id IN ({id_list})")]

        reconciler = {}
        steps: dict[str, list[float]] = {}
        points_ingested = 0.0
        for proc, p, _ in run.controllers:
            text = http_get(p, "/metrics")[1].decode()
            passes = {}
            for role in ("leader", "follower"):
                h = histogram_from_metrics("\n".join(l for l in text.splitlines() if f'role="{role}"' in l), "lathe_reconciler_pass_seconds")
                if h["count"]:
                    passes[role] = {"passes": h["count"], "mean_ms": round(h["sum"] / h["count"] * 1000, 1),
                                    "p99_bucket_ms": (bucket_quantile(h, 0.99) or 0) * 1000}
            reconciler[p] = passes
            # The leader's steps, summed over both replicas (leadership can move).
            for step in set(re.findall(r'lathe_reconciler_step_seconds_count\{step="([^"]+)"\}', text)):
                h = histogram_from_metrics("\n".join(l for l in text.splitlines() if f'step="{step}"' in l), "lathe_reconciler_step_seconds")
                total = steps.setdefault(step, [0.0, 0.0])
                total[0] += h["sum"]
                total[1] += h["count"]
            points_ingested += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lathe_metric_points_ingested_total"))
        cpu = {p: round(proc_cpu_seconds(proc.pid) - cpu_before[p], 1) for proc, p, _ in run.controllers}
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=60)
        sampler.stop_.set()
        sim_report = json.loads((run.dir / "sim.json").read_text())

        # Postgres's view: every job and attempt of the backlog.
        created_to_claimed = [float(ms) for (ms,) in run.psql(
            f"SELECT extract(epoch FROM a.started_at - j.created_at) * 1000 FROM attempts a JOIN jobs j ON j.id = a.job_id "
            f"WHERE a.number = 1 AND j.created_at <= '{backlog_end}'")]
        refill = [float(ms) for (ms,) in run.psql(f"""
            SELECT extract(epoch FROM next_start - ended_at) * 1000 FROM (
              SELECT ended_at, lead(started_at) OVER (PARTITION BY worker_id ORDER BY started_at) AS next_start
              FROM attempts WHERE started_at >= '{backlog_start}' AND started_at <= '{backlog_end}') s
            WHERE next_start IS NOT NULL AND ended_at IS NOT NULL""")]
        statuses = {s: int(n) for s, n in run.psql("SELECT status, count(*) FROM jobs GROUP BY status")}
        lost = sum(n for s, n in statuses.items() if s != "succeeded")
        # The window in which every project had jobs queued in every pool: from the last job
        # created (plus the longest job) to the moment the first (project, pool) had its last job claimed.
        window_end = run.psql(f"""
            SELECT min(last_claim) FROM (
              SELECT max(a.started_at) AS last_claim FROM attempts a JOIN jobs j ON j.id = a.job_id
              WHERE a.number = 1 AND j.created_at <= '{backlog_end}' AND j.priority <> 10
              GROUP BY j.project_id, j.pool) s""")[0][0]
        # Shares settle once the jobs running when the backlog formed (started in creation
        # order) have ended: the window opens one longest job later.
        longest = float(args.job_seconds.split(":")[1])
        window_start = run.psql(f"SELECT '{submitted_at}'::timestamptz + interval '{longest} seconds'")[0][0]
        share = shares(run, weights, (window_start, window_end))
        preempted = int(run.psql("SELECT count(*) FROM attempts WHERE outcome = 'preempted'")[0][0])
        attempts_by_outcome = {o: int(n) for o, n in run.psql("SELECT coalesce(outcome, 'live'), count(*) FROM attempts GROUP BY 1")}
        worst_share = max((v["off_by"] for pool in share.values() for v in pool.values()), default=None)
        backlog_seconds = run.psql(f"SELECT extract(epoch FROM '{backlog_end}'::timestamptz - '{backlog_start}'::timestamptz)")[0][0]

        report = {
            "machine": cpu_name(),
            "workers": args.workers, "jobs": args.jobs, "urgent_jobs": urgent, "pools": pools, "weights": weights,
            "controllers": 2, "job_seconds": args.job_seconds, "metrics_seconds": args.metrics_seconds,
            "points_per_batch": args.points_per_batch, "crash_rate": args.crash_rate,
            "lease_seconds": args.lease_seconds, "heartbeat_seconds": args.heartbeat_seconds,
            "enrol_seconds": round(enrol_seconds, 1),
            "create_jobs_per_second": round(args.jobs / submit_seconds, 1),
            "backlog_seconds": round(float(backlog_seconds), 1),
            "finished_within_deadline": finished,
            "jobs_lost": lost, "job_statuses": statuses,
            "jobs_finished_twice": sim_report["jobs_finished_twice"],
            "idle_fleet_queued_to_claimed_ms": percentiles(idle_latency),
            "backlog_queued_to_claimed_ms": percentiles(created_to_claimed),
            "backlog_free_worker_refill_ms": percentiles(refill),
            "claim_rpc_ms": sim_report["claim_rpc_ms"],
            "heartbeat_rpc_ms": sim_report["heartbeat_rpc_ms"],
            "metric_points_per_second": round(points_ingested / float(backlog_seconds), 1),
            "reconciler_pass": reconciler,
            "reconciler_step_mean_ms": {k: round(v[0] / v[1] * 1000, 1) for k, v in sorted(steps.items()) if v[1]},
            "postgres_connections_max": sampler.max_connections,
            "controller_cpu_seconds": cpu,
            "controller_rss_max_mb": {p: round(b / 2**20, 1) for p, b in sampler.max_rss.items()},
            "share_window": [window_start, window_end],
            "shares": share, "shares_worst_off_by": worst_share,
            "preemptions": preempted, "attempts_by_outcome": attempts_by_outcome,
            "simulator": sim_report,
            "seconds": round(time.time() - began, 1),
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print_table(report)
        return 0 if finished and lost == 0 and sim_report["jobs_finished_twice"] == 0 else 1
    finally:
        run.stop()


def print_table(r: dict):
    i, b = r["idle_fleet_queued_to_claimed_ms"], r["backlog_free_worker_refill_ms"]
    rows = [
        ("machine", r["machine"]),
        ("workers / jobs / controllers", f"{r['workers']} / {r['jobs']} (+{r['urgent_jobs']} priority 10) / {r['controllers']}"),
        ("enrolment of every worker", f"{r['enrol_seconds']} s"),
        ("backlog drained in", f"{r['backlog_seconds']} s"),
        ("jobs lost / finished twice", f"{r['jobs_lost']} / {r['jobs_finished_twice']}"),
        ("queued→claimed, idle fleet p50/p99", f"{i.get('p50')} / {i.get('p99')} ms"),
        ("free worker refilled, backlog p50/p99", f"{b.get('p50')} / {b.get('p99')} ms"),
        ("claim RPC p50/p99", f"{r['claim_rpc_ms'].get('p50')} / {r['claim_rpc_ms'].get('p99')} ms"),
        ("heartbeat RPC p50/p99", f"{r['heartbeat_rpc_ms'].get('p50')} / {r['heartbeat_rpc_ms'].get('p99')} ms"),
        ("metric points ingested", f"{r['metric_points_per_second']} /s"),
        ("reconciler pass mean, leader / follower", ", ".join(
            "/".join(f"{v[role]['mean_ms']} ms" if role in v else "-" for role in ("leader", "follower")) for v in r["reconciler_pass"].values())),
        ("leader's steps, mean ms", ", ".join(f"{k} {v}" for k, v in r["reconciler_step_mean_ms"].items())),
        ("Postgres connections (max)", r["postgres_connections_max"]),
        ("controller CPU s / max RSS MB", ", ".join(f"{c} s / {m} MB" for c, m in zip(r["controller_cpu_seconds"].values(), r["controller_rss_max_mb"].values()))),
        ("preemptions", r["preemptions"]),
        ("worst share off its weight", r["shares_worst_off_by"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for pool, projects in r["shares"].items():
        print(f"  shares in {pool}: " + ", ".join(f"{p} {v['share']:.3f} (weight {v['weight_share']:.3f})" for p, v in projects.items()))


if __name__ == "__main__":
    sys.exit(main())
