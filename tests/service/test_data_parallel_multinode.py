"""A job spread over two nodes through the service: deploy/slurm/lathe-gang-worker.sbatch in a
two-node allocation of the test Slurm cluster (two slurmd on this machine) runs a worker on the
first node; a job with "gpus": 2, "nodes": 2 runs as rank 0 in that worker and rank 1 on the
other node through srun, and learns what one rank with the whole batch learns (fp32)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lathe_service import create_job, metrics_curve, wait_for_status, wait_until
from slurm_cluster import Node, SlurmCluster, require_slurm

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "lathe-gang-worker.sbatch"


def test_a_two_node_job_runs_rank_1_on_the_other_node_and_matches_one_rank(service, client, api_key, training_file_id, tmp_path):
    require_slurm()
    with SlurmCluster(tmp_path / "slurm", [Node("m1", gpus=4), Node("m2", gpus=4)]) as cluster:
        env = {**cluster.env, **service.worker_env(), "LATHE_POOLS": "multinode", "LATHE_DTYPE": "fp32", "LATHE_GPUS": "1",
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
               "SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"]}
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--export=ALL",
             f"--chdir={tmp_path}", f"--output={tmp_path}/gang-worker.out", str(TEMPLATE)],
            capture_output=True, text=True, env=env, timeout=30)
        assert submitted.returncode == 0, submitted.stderr
        pilot = submitted.stdout.strip().split(";")[0]
        log = tmp_path / "gang-worker.out"
        wait_until(lambda: any(w.get("nodes") == 2 for w in service.admin("workers?limit=1000")["data"]) or None, 60,
                   lambda: f"the gang worker to register:\n{log.read_text() if log.exists() else ''}")

        spread = create_job(client, training_file_id, n_epochs=2, pool="multinode", extra={"gpus": 2, "nodes": 2}, batch_size=8)
        one = create_job(client, training_file_id, n_epochs=2, pool="multinode", extra={"gpus": 1}, batch_size=8)
        spread = wait_for_status(client, spread.id, "succeeded", timeout=300)
        wait_for_status(client, one.id, "succeeded", timeout=300)
        events = [e.message for e in client.fine_tuning.jobs.list_events(spread.id, limit=100)]
        assert any(f"2 ranks over 2 nodes of Slurm job {pilot}" in m for m in events), events
        curve_spread, curve_one = metrics_curve(service, api_key, spread.id), metrics_curve(service, api_key, one.id)
        assert [p["step"] for p in curve_spread] == [p["step"] for p in curve_one]
        for a, b in zip(curve_spread, curve_one):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), f"step {a['step']}"
        hosts = (service.data_dir / "jobs" / spread.id / "rank-hosts").read_text().split()
        assert hosts == ["m2"], f"rank 1 should run on the other node, the hostfile says {hosts}"
        cluster.run("scancel", pilot)
