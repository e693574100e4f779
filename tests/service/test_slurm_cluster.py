"""The Slurm test cluster (slurm_cluster.py) and the Slurm behaviour Lathe's pilot jobs rely on:
features route jobs to pools, fake GPUs reach jobs as CUDA_VISIBLE_DEVICES, which scancel form
delivers SIGTERM to the pilot, and what squeue prints for the pilot's job name.

One two-node cluster serves the module: n1 is the a100 pool with one GPU, n2 the h100 pool
without. No Lathe process runs here.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import Node, SlurmCluster, SlurmCommandError, require_slurm

# A stand-in for the pilot: on SIGTERM it writes `<marker>` and exits 0. It starts a child that
# writes `<marker>.child` if it gets SIGTERM too, and writes `<marker>.ready` once both run.
PILOT = """
import signal, subprocess, sys, time
marker = sys.argv[1]
child = subprocess.Popen(["bash", "-c", f"trap 'touch {marker}.child; exit 0' TERM; while :; do sleep 0.1; done"])
def on_term(signum, frame):
    open(marker, "w").write("TERM")
    time.sleep(0.3)  # time for the child to get a signal sent to the whole job
    child.kill()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(marker + ".ready", "w").write("")
while True:
    time.sleep(0.1)
"""


@pytest.fixture(autouse=True)
def clean_slate():
    """Overrides the suite's fixture of that name, which starts a Lathe controller and worker."""
    yield


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_slurm()
    nodes = [Node("n1", features=["a100"], gpus=1), Node("n2", features=["h100"])]
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes) as cluster:
        yield cluster


@pytest.fixture
def cluster(slurm):
    """The module's cluster, with no job before or after the test."""
    slurm.cancel_all_jobs()
    yield slurm
    slurm.cancel_all_jobs()


def submit_pilot(cluster: SlurmCluster, marker: Path, *sbatch_args: str) -> str:
    """A batch script that execs the pilot, as Lathe's will: the pilot is the batch step's process."""
    pilot = cluster.workdir / "pilot.py"
    pilot.write_text(PILOT)
    script = cluster.workdir / f"{marker.name}.sh"
    script.write_text(f"#!/bin/bash\nexec {shlex.quote(sys.executable)} {pilot} {marker}\n")
    job_id = cluster.sbatch(*sbatch_args, script)
    cluster.wait_for(Path(f"{marker}.ready").exists, 15,
                     lambda: f"the pilot of job {job_id} to start (squeue: {cluster.squeue_jobs()})")
    return job_id


def test_constraints_route_jobs_to_the_pool_nodes_and_gpu_jobs_see_cuda_visible_devices(cluster):
    report = 'echo "node=$SLURMD_NODENAME cuda=${CUDA_VISIBLE_DEVICES-unset}"; sleep 1'
    h100 = cluster.sbatch("--constraint=h100", "--wrap", report)
    a100 = cluster.sbatch("--constraint=a100", "--gres=gpu:1", "--wrap", report)

    assert cluster.wait_job_running(h100) == "n2"
    assert cluster.wait_job_running(a100) == "n1"
    cluster.wait_jobs_gone()
    assert cluster.output_of(h100).read_text().split() == ["node=n2", "cuda=unset"]
    assert cluster.output_of(a100).read_text().split() == ["node=n1", "cuda=0"]
    # A pool without GPUs cannot take a GPU job: sbatch says so at once, nothing queues.
    with pytest.raises(SlurmCommandError, match="Requested node configuration is not available"):
        cluster.sbatch("--constraint=h100", "--gres=gpu:1", "--wrap", "true")
    assert cluster.squeue_jobs() == []


def test_scancel_signal_term_alone_does_not_reach_a_batch_script_without_steps(cluster):
    marker = cluster.workdir / "marker-plain-signal"
    job_id = submit_pilot(cluster, marker)

    cluster.run("scancel", "--signal=TERM", job_id)  # exits 0 …
    time.sleep(2)  # the forms below deliver within 0.1 s
    assert not marker.exists(), "plain `scancel --signal=TERM` reached the batch script"
    assert cluster.job(job_id)["state"] == "RUNNING"  # … and the job runs on, untouched


@pytest.mark.parametrize("scancel_args, child_gets_term, final_state", [
    # Only the batch step's own process, the exec'd pilot: the pilot decides what its children get.
    (["--signal=TERM", "--batch"], False, "COMPLETED"),
    # The batch step's process and its children.
    (["--signal=TERM", "--full"], True, "COMPLETED"),
    # A plain cancel: SIGTERM to everything, SIGKILL KillWait later, and the job is CANCELLED.
    ([], True, "CANCELLED"),
], ids=["batch", "full", "cancel"])
def test_scancel_delivers_sigterm_to_the_execd_pilot(cluster, scancel_args, child_gets_term, final_state):
    marker = cluster.workdir / f"marker-{'-'.join(a.strip('-') for a in scancel_args) or 'cancel'}"
    job_id = submit_pilot(cluster, marker)

    cluster.run("scancel", *scancel_args, job_id)
    cluster.wait_for(marker.exists, 5, f"the pilot's SIGTERM marker after scancel {' '.join(scancel_args)}")
    cluster.wait_job_gone(job_id)
    assert Path(f"{marker}.child").exists() == child_gets_term
    job = cluster.scontrol_job(job_id)
    assert (job["JobState"], job["ExitCode"]) == (final_state, "0:0"), job


def test_sbatch_accepts_a_batch_signal_before_the_time_limit(cluster):
    # Not waited for here: slurmctld checks time limits on a ~30 s cycle (`--time=1
    # --signal=B:TERM@60` reached the pilot 23 s into the job).
    job_id = submit_pilot(cluster, cluster.workdir / "marker-time-limit", "--time=10", "--signal=B:TERM@120")
    assert cluster.job(job_id)["state"] == "RUNNING"
    with pytest.raises(SlurmCommandError, match="Invalid --signal specification"):
        cluster.sbatch("--time=10", "--signal=B:TERM@soon", "--wrap", "true")


def test_pilot_jobs_are_listed_by_name_with_states_that_parse(cluster):
    # n1 has one GPU: the first a100 pilot runs, the second waits for it.
    a100_pilot = ["--job-name", "lathe-pilot-a100", "--constraint=a100", "--gres=gpu:1", "--wrap", "sleep 30"]
    running = cluster.sbatch(*a100_pilot)
    assert cluster.wait_job_running(running) == "n1"
    pending = cluster.sbatch(*a100_pilot)
    # A pending a100 pilot does not hold back another pool's (backfill looks past it).
    other_pool = cluster.sbatch("--job-name", "lathe-pilot-h100", "--constraint=h100", "--wrap", "sleep 30")
    assert cluster.wait_job_running(other_pool) == "n2"

    # Exactly what Lathe's Slurm backend runs; a pending job has no node, so its line has 3 fields.
    out = cluster.run("squeue", "--name", "lathe-pilot-a100", "--noheader", "--format", "%i %j %T %N")
    rows = {}
    for line in out.splitlines():
        job_id, name, state, *node = line.split()
        rows[job_id] = (name, state, node)
    assert rows == {running: ("lathe-pilot-a100", "RUNNING", ["n1"]),
                    pending: ("lathe-pilot-a100", "PENDING", [])}, out
    assert [job["state"] for job in cluster.squeue_jobs(name="lathe-pilot-h100")] == ["RUNNING"]
