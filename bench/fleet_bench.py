"""Slurm autoscaler benchmark (run by scripts/bench_fleet.sh): a controller with no worker, a
real two-node Slurm on this machine (tests/service/slurm_cluster.py), `lathe slurm autoscale`.

1. Time from a job queued to its first optimizer step, split into: pilot submitted (in squeue),
   pilot running, its worker registered, first step. Repeated; the pilot exits when idle in between.
2. Slurm calls per autoscaler pass (`--once`) with 1, 10 and 100 queued jobs, counted by shims
   on PATH that log each squeue/sbatch before running the real one. Pilots are submitted held
   (`--hold`) so that none runs.

Prints a table and writes JSON (--out)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "service"))
from lathe_service import (Process, Service, create_job, example_rows, find_lathe_bin, make_client,  # noqa: E402
                           metrics_curve, wait_until, write_jsonl)
from slurm_cluster import Node, SlurmCluster, require_slurm  # noqa: E402

TEMPLATE = ROOT / "deploy" / "slurm" / "lathe-pilot.sbatch"


def config(path: Path, service: Service, pools: dict[str, dict]) -> Path:
    text = f'controller = "http://127.0.0.1:{service.http_port}"\ninterval_seconds = 1\ntemplate = "{TEMPLATE}"\n'
    for pool, settings in pools.items():
        text += f"\n[pools.{pool}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    path.write_text(text)
    return path


def shims(directory: Path, log: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("squeue", "sbatch"):
        real = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        shim = directory / tool
        shim.write_text(f'#!/bin/bash\necho {tool} >> "{log}"\nexec {real} "$@"\n')
        shim.chmod(0o755)
    return directory


def first_step_latency(service, cluster, client, training, env, workdir, runs: int) -> list[dict]:
    cfg = config(workdir / "latency.toml", service, {"a100": {
        "max_pilots": 1, "gres": "gpu:1", "constraint": "a100", "idle_exit_seconds": 2, "extra_sbatch_args": ["--cpus-per-task=1"]}})
    scaler = Process("autoscaler", [str(service.bin), "slurm", "autoscale", "--config", str(cfg)], env, workdir, service.log_dir)
    results = []
    try:
        for i in range(runs):
            wait_until(lambda: not cluster.squeue_jobs(name="lathe-pilot-a100"), 60, "a pilot from the last run is still there")
            t0 = time.monotonic()
            job = create_job(client, training, pool="a100", seed=i)
            marks = {}
            while "first_step" not in marks:
                now = time.monotonic() - t0
                pilots = cluster.squeue_jobs(name="lathe-pilot-a100")
                if pilots and "submitted" not in marks:
                    marks["submitted"] = now
                if any(p["state"] == "RUNNING" for p in pilots) and "running" not in marks:
                    marks["running"] = now
                if "registered" not in marks and any(w["slurm_job_id"] in {p["id"] for p in pilots} and w["state"] == "live"
                                                     for w in service.admin("workers")["data"]):
                    marks["registered"] = now
                if metrics_curve(service, service.bench_key, job.id):
                    marks["first_step"] = now
                if now > 120:
                    raise RuntimeError(f"no first step after 120 s: {marks}\n{scaler.tail()}")
                time.sleep(0.05)
            results.append({k: round(v, 2) for k, v in marks.items()})
            wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "succeeded", 120, "the job did not finish")
    finally:
        scaler.stop()
    return results


def calls_per_pass(service, cluster, client, training, env, workdir, counts: list[int]) -> list[dict]:
    log = workdir / "slurm-calls.log"
    env = dict(env, PATH=f"{shims(workdir / 'shims', log)}:{env['PATH']}")
    cfg = config(workdir / "calls.toml", service, {"scale": {
        "max_pilots": 1000, "constraint": "a100", "extra_sbatch_args": ["--hold", "--cpus-per-task=1"]}})
    rows = []
    for n in counts:
        jobs = [create_job(client, training, pool="scale", seed=i) for i in range(n)]
        for label in ("first pass", "second pass"):
            log.write_text("")
            t0 = time.monotonic()
            out = subprocess.run([str(service.bin), "slurm", "autoscale", "--config", str(cfg), "--once"], env=env,
                                 capture_output=True, text=True, timeout=120, cwd=workdir)
            elapsed = time.monotonic() - t0
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            calls = log.read_text().split()
            rows.append({"queued_jobs": n, "pass": label, "squeue": calls.count("squeue"), "sbatch": calls.count("sbatch"),
                         "pilots_in_queue": len(cluster.squeue_jobs(name="lathe-pilot-scale")), "seconds": round(elapsed, 3),
                         "report": out.stdout.strip()})
        cluster.run("scancel", "--name", "lathe-pilot-scale")
        for job in jobs:
            client.fine_tuning.jobs.cancel(job.id)
        wait_until(lambda: not cluster.squeue_jobs(name="lathe-pilot-scale"), 60, "held pilots did not go")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require_slurm()
    workdir = args.out.parent
    workdir.mkdir(parents=True, exist_ok=True)
    service = Service(find_lathe_bin(), workdir / "service")
    nodes = [Node("n1", features=["a100"], gpus=1), Node("n2", features=["h100"])]
    with SlurmCluster(workdir / "slurm", nodes) as cluster:
        try:
            service.init_model()
            service.start_controller()
            service.bench_key = service.create_key("bench")
            client = make_client(service, service.bench_key)
            with open(write_jsonl(workdir / "train.jsonl", example_rows(24)), "rb") as f:
                training = client.files.create(file=f, purpose="fine-tune").id
            env = dict(service.worker_env(), SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"],
                       LATHE_ADMIN_TOKEN=service.admin_token)
            latency = first_step_latency(service, cluster, client, training, env, workdir, args.runs)
            calls = calls_per_pass(service, cluster, client, training, env, workdir, [1, 10, 100])
        finally:
            service.shutdown()
    report = {"first_step": latency, "first_step_median_s": statistics.median(r["first_step"] for r in latency),
              "calls": calls, "interval_seconds": 1, "cpus": os.cpu_count()}
    args.out.write_text(json.dumps(report, indent=2))
    print("queued → first step (s), autoscaler interval 1 s:")
    print("  run  submitted  running  registered  first step")
    for i, r in enumerate(latency):
        print(f"  {i + 1:>3}  {r.get('submitted', 0):>9}  {r.get('running', 0):>7}  {r.get('registered', 0):>10}  {r['first_step']:>10}")
    print("Slurm calls per autoscaler pass:")
    print("  queued  pass         squeue  sbatch  pilots in queue  seconds")
    for r in calls:
        print(f"  {r['queued_jobs']:>6}  {r['pass']:<11}  {r['squeue']:>6}  {r['sbatch']:>6}  {r['pilots_in_queue']:>15}  {r['seconds']:>7}")


if __name__ == "__main__":
    main()
