"""The service benchmark (run by scripts/bench_service.sh, which starts the controller and a worker).

Measures, on a running controller with one idle real worker:
1. submit-to-claimed latency: a job is created over REST while the worker waits in Redis; the
   latency is attempts.started_at - jobs.created_at, both Postgres timestamps (no polling error);
   each job is cancelled once claimed, and the next is submitted once the worker reports itself
   idle again (its lathe_worker_busy gauge);
2. metric-point ingest: services/controller/examples/ingest_load — many simulated workers stream
   points over gRPC at once — against the reference, the same writes made straight into Postgres;
3. API latency of GET /v1/fine_tuning/jobs/{id}: idle, and while the ingest load runs.
Without --load-bin, 2. and the GET latency under load are left out (the report says so).
Prints a report and writes it as JSON (--out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Api:
    def __init__(self, port: int, key: str):
        self.port, self.key = port, key

    def request(self, method: str, path: str, body: dict | bytes | None = None, content_type="application/json", conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Authorization": f"Bearer {self.key}"}
        if data is not None:
            headers["Content-Type"] = content_type
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        if own:
            conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None

    def upload(self, path: Path) -> str:
        boundary = "benchboundary7d1a"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")["id"]


def psql(db_url: str, sql: str) -> list[str]:
    out = subprocess.run(["psql", db_url, "-At", "-c", sql], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def worker_idle(metrics_url: str) -> bool:
    """The worker's lathe_worker_busy{worker="…"} reads 0 (the series carries the worker's name,
    services/worker/src/telemetry.rs; the bench runs one worker, so one series)."""
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    busy = [float(m.group(1)) for m in re.finditer(r"^lathe_worker_busy(?:\{[^}]*\})? (\S+)$", text, re.M)]
    if not busy:
        raise RuntimeError(f"{metrics_url} has no lathe_worker_busy sample:\n{text[:2000]}")
    return all(value == 0 for value in busy)


def claim_latency(api: Api, db_url: str, file_id: str, samples: int, worker_metrics: str) -> dict:
    latencies = []
    for i in range(samples):
        # Measure with the worker idle in its Redis wait, not still stopping the previous job.
        deadline = time.monotonic() + 60
        while not worker_idle(worker_metrics):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not become idle within 60 s")
            time.sleep(0.02)
        time.sleep(0.05)
        job = api.request("POST", "/v1/fine_tuning/jobs", {"model": "tiny-qwen3", "training_file": file_id, "seed": i,
                                                          "hyperparameters": {"n_epochs": 1}, "max_seq_length": 128})
        deadline = time.monotonic() + 30
        while True:
            rows = psql(db_url, "SELECT extract(epoch FROM a.started_at - j.created_at) FROM attempts a "
                                f"JOIN jobs j ON j.id = a.job_id WHERE a.job_id = '{job['id']}' AND a.number = 1")
            if rows:
                latencies.append(float(rows[0]))
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job['id']} was not claimed within 30 s")
            time.sleep(0.02)
        api.request("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})
    ms = [x * 1000 for x in latencies]
    return {"samples": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms),
            "mean_ms": statistics.fmean(ms)}


def get_latency(api: Api, job_id: str, seconds: float, threads: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def hammer():
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        mine = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            api.request("GET", f"/v1/fine_tuning/jobs/{job_id}", conn=conn)
            mine.append((time.perf_counter() - started) * 1000)
        conn.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"threads": threads, "requests": len(latencies), "requests_per_second": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def ingest(load_bin: str, grpc: str, db_url: str, args, direct: bool) -> dict:
    cmd = [load_bin, "--database-url", db_url, "--workers", str(args.ingest_workers), "--batches", str(args.batches),
           "--points", str(args.points)]
    cmd += ["--direct"] if direct else ["--grpc", grpc]
    # A load generator whose task panics waits on its barrier for ever: fail with its stderr instead.
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr or b""  # bytes, even with text=True
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        raise RuntimeError(f"{' '.join(cmd)} did not finish in 600 s:\n{stderr[-3000:]}") from None
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--training-file", type=Path, required=True)
    p.add_argument("--load-bin", help="services/controller/examples/ingest_load, built; without it no ingest runs")
    p.add_argument("--worker-metrics", required=True, help="the idle worker's /metrics URL")
    p.add_argument("--claim-samples", type=int, default=100)
    p.add_argument("--ingest-workers", type=int, default=16)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--points", type=int, default=250)
    p.add_argument("--get-seconds", type=float, default=10)
    p.add_argument("--get-threads", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    api = Api(args.http_port, args.api_key)
    file_id = api.upload(args.training_file)
    report = {"claim_latency": claim_latency(api, args.database_url, file_id, args.claim_samples, args.worker_metrics)}
    some_job = api.request("GET", "/v1/fine_tuning/jobs?limit=1")["data"][0]["id"]
    report["get_idle"] = get_latency(api, some_job, args.get_seconds, args.get_threads)
    c, gi = report["claim_latency"], report["get_idle"]
    lines = [
        f"submit -> claimed (idle worker, {c['samples']} jobs): p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms",
        f"GET job ({args.get_threads} threads): idle p50 {gi['p50_ms']:.1f} ms p99 {gi['p99_ms']:.1f} ms "
        f"({gi['requests_per_second']:.0f} req/s)",
    ]
    if not args.load_bin:
        lines.append("metric ingest: not measured (no --load-bin)")
        print("\n".join(lines))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return
    # Reference and measurement back to back, each alone on the machine.
    report["ingest_direct"] = ingest(args.load_bin, args.grpc, args.database_url, args, direct=True)
    report["ingest_grpc"] = ingest(args.load_bin, args.grpc, args.database_url, args, direct=False)

    # Then the API under that write load.
    under_load: dict = {}
    hammer = threading.Thread(target=lambda: under_load.update(get_latency(api, some_job, args.get_seconds, args.get_threads)))
    hammer.start()
    report["ingest_grpc_with_gets"] = ingest(args.load_bin, args.grpc, args.database_url, args, direct=False)
    hammer.join()
    report["get_under_ingest"] = under_load
    report["ingest_ratio_vs_direct"] = report["ingest_grpc"]["points_per_second"] / report["ingest_direct"]["points_per_second"]

    gl = report["get_under_ingest"]
    lines += [
        f"metric ingest over gRPC: {report['ingest_grpc']['points_per_second']:,.0f} points/s "
        f"({args.ingest_workers} workers x {args.batches} batches x {args.points} points; goal 50,000/s)",
        f"  reference, same writes straight into Postgres: {report['ingest_direct']['points_per_second']:,.0f} points/s "
        f"-> ratio {report['ingest_ratio_vs_direct']:.2f}",
        f"GET job under ingest ({args.get_threads} threads): p50 {gl['p50_ms']:.1f} ms p99 {gl['p99_ms']:.1f} ms "
        f"({gl['requests_per_second']:.0f} req/s)",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
