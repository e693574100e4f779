"""Workers launched by Slurm on demand (issue 10), on a real two-node Slurm on this machine
(slurm_cluster.py): `lathe slurm autoscale` reads demand from the controller and pilots from
squeue, submits pilots (deploy/slurm/lathe-pilot.sbatch, unchanged) with sbatch, and the pilots'
workers enrol with the fleet secret, run the pool's jobs and leave when idle.

n1 has the feature a100 and two (fake) GPUs, n2 the feature h100 and one; a pilot asks for one
GPU, so Slurm sets CUDA_VISIBLE_DEVICES and the workers still train on the CPU (LATHE_DEVICE=cpu).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe_service import (LONG_EPOCHS, Process, assert_complete_curve, create_job, metrics_curve, wait_for_status,
                           wait_for_step, wait_until)
from slurm_cluster import Node, SlurmCluster, require_slurm

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
PILOT_TEMPLATE = REPO / "deploy" / "slurm" / "lathe-pilot.sbatch"
MAX_A100_PILOTS = 2
IDLE_EXIT_SECONDS = 4
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_slurm()
    nodes = [Node("n1", features=["a100"], gpus=2), Node("n2", features=["h100"], gpus=1)]
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes) as cluster:
        yield cluster


class Autoscaler:
    """`lathe slurm autoscale` as an operator runs it: a config file, the admin token in the
    environment, the fleet secret in the environment pilots inherit (sbatch --export=ALL)."""

    def __init__(self, service, slurm: SlurmCluster, workdir: Path):
        self.service, self.slurm, self.workdir = service, slurm, workdir
        (workdir / "pilots").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "autoscale.toml"
        self.config.write_text(f"""
controller = "http://127.0.0.1:{service.http_port}"
interval_seconds = 1
template = "{PILOT_TEMPLATE}"
output_dir = "{workdir / 'pilots'}"

[pools.a100]
max_pilots = {MAX_A100_PILOTS}
gres = "gpu:1"
max_gpus_per_pilot = 2
constraint = "a100"
time_limit = "00:30:00"
idle_exit_seconds = {IDLE_EXIT_SECONDS}
extra_sbatch_args = ["--cpus-per-task=1"]

[pools.h100]
max_pilots = 1
gres = "gpu:1"
constraint = "h100"
time_limit = "00:30:00"
idle_exit_seconds = {IDLE_EXIT_SECONDS}
extra_sbatch_args = ["--cpus-per-task=1"]
""")
        self.env = dict(service.worker_env(), SLURM_CONF=slurm.env["SLURM_CONF"], PATH=slurm.env["PATH"],
                        LATHE_ADMIN_TOKEN=service.admin_token)
        self.process: Process | None = None
        self.starts = 0

    def start(self):
        self.starts += 1
        self.process = Process(f"autoscaler-{self.starts}",
                               [str(self.service.bin), "slurm", "autoscale", "--config", str(self.config)],
                               self.env, self.workdir, self.service.log_dir)
        self.service.others.append(self.process)  # its log joins a failure's report

    def stop(self):
        if self.process and self.process.alive():
            self.process.stop()

    def pilots(self, pool: str) -> list[dict]:
        return self.slurm.squeue_jobs(name=f"lathe-pilot-{pool}")


@pytest.fixture(scope="module")
def autoscaler(service, slurm, tmp_path_factory):
    scaler = Autoscaler(service, slurm, tmp_path_factory.mktemp("autoscaler"))
    scaler.start()
    yield scaler
    scaler.stop()
    slurm.cancel_all_jobs()


def worker_of_attempt(service, job_id: str, number: int) -> dict:
    attempt = next(a for a in service.attempts(job_id) if a["number"] == number)
    return next(w for w in service.admin("workers?limit=1000")["data"] if w["id"] == attempt["worker_id"])


def test_queued_jobs_bring_pilots_that_run_each_once_then_leave(service, client, training_file_id, slurm, autoscaler):
    jobs = [create_job(client, training_file_id, pool="a100", seed=40 + i) for i in range(4)]
    most = {"pilots": 0}

    def watch_until_done():
        most["pilots"] = max(most["pilots"], len(autoscaler.pilots("a100")))
        statuses = [client.fine_tuning.jobs.retrieve(j.id).status for j in jobs]
        assert not {"failed", "cancelled"} & set(statuses), statuses
        return all(s == "succeeded" for s in statuses)

    wait_until(lambda: autoscaler.pilots("a100"), 30, lambda: f"no pilot submitted\n{autoscaler.process.tail()}")
    # The autoscaler keeps no state: a restart re-reads squeue and submits no extra pilots.
    autoscaler.process.kill()
    autoscaler.start()
    wait_until(watch_until_done, 300, "the four a100 jobs did not all succeed", interval=0.2)
    assert 1 <= most["pilots"] <= MAX_A100_PILOTS, f"{most['pilots']} pilots at once, max is {MAX_A100_PILOTS}"

    for job in jobs:
        attempts = service.attempts(job.id)
        assert [a["outcome"] for a in attempts] == ["succeeded"], f"{job.id} ran more than once: {attempts}"
        worker = worker_of_attempt(service, job.id, 1)
        assert worker["slurm_job_id"], f"{job.id} ran on a worker that is not a Slurm pilot: {worker}"
        assert slurm.scontrol_job(worker["slurm_job_id"])["NodeList"] == "n1", "an a100 pilot ran off the a100 node"
    # Idle pilots leave by themselves; nothing is cancelled.
    wait_until(lambda: not autoscaler.pilots("a100"), IDLE_EXIT_SECONDS + 60, "the pilots did not exit when idle")
    assert service.admin("demand?pool=a100")["data"][0]["workers"] == 0, "exited pilots still count as workers"
    states = {slurm.scontrol_job(w["slurm_job_id"])["JobState"] for w in service.admin("workers?limit=1000")["data"] if w["slurm_job_id"]}
    assert states == {"COMPLETED"}, f"pilots ended {states}, not by their idle exit"


def test_a_pilot_signalled_mid_job_hands_it_back_and_another_pilot_finishes_it_with_the_same_losses(
        service, client, api_key, training_file_id, slurm, autoscaler):
    reference = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=21)  # the session's worker
    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=21, pool="a100")
    wait_for_step(service, client, api_key, job.id, 1, timeout=120)
    pilot = worker_of_attempt(service, job.id, 1)["slurm_job_id"]
    # What Slurm does at a time limit (--signal=B:TERM@120) or on preemption.
    slurm.run("scancel", "--signal=TERM", "--batch", pilot)

    wait_for_status(client, job.id, "succeeded", timeout=300)
    attempts = service.attempts(job.id)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "preempted"), (2, "succeeded")], attempts
    assert service.job_column(job.id, "retries") == "0", "the hand-back was counted as a failed try"
    assert worker_of_attempt(service, job.id, 2)["slurm_job_id"] != pilot, "the signalled pilot ran the job on"
    assert slurm.scontrol_job(pilot)["JobState"] == "COMPLETED", "the signalled pilot did not exit cleanly"

    wait_for_status(client, reference.id, "succeeded", timeout=300)
    straight = metrics_curve(service, api_key, reference.id)
    curve = metrics_curve(service, api_key, job.id)
    assert assert_complete_curve(curve, job.id) == assert_complete_curve(straight, reference.id)
    for resumed, undisturbed in zip(curve, straight):
        assert resumed["train_loss"] == pytest.approx(undisturbed["train_loss"], rel=LOSS_RTOL), (
            f"step {resumed['step']}: {resumed['train_loss']} after the hand-back, {undisturbed['train_loss']} undisturbed")


def test_a_job_in_pool_h100_runs_only_on_the_h100_node(service, client, training_file_id, slurm, autoscaler):
    job = create_job(client, training_file_id, pool="h100")
    wait_for_status(client, job.id, "succeeded", timeout=180)
    worker = worker_of_attempt(service, job.id, 1)
    assert "h100" in worker["pools"] and worker["slurm_job_id"], worker
    assert slurm.scontrol_job(worker["slurm_job_id"])["NodeList"] == "n2"
    assert worker["name"].startswith(f"pilot-{worker['slurm_job_id']}@"), worker["name"]


def test_a_two_gpu_job_gets_a_pilot_of_its_size_and_an_eight_gpu_job_a_reason(
        service, client, training_file_id, slurm, autoscaler):
    # n1 has two GPUs and the pool allows pilots of up to two: the 2-GPU job gets one; nothing
    # in the pool could ever run 8 GPUs, which the job is told, and it stays queued.
    too_big = create_job(client, training_file_id, pool="a100", batch_size=8, extra={"gpus": 8})
    job = create_job(client, training_file_id, pool="a100", seed=7, extra={"gpus": 2})
    try:
        wait_for_status(client, job.id, "succeeded", timeout=300)
        worker = worker_of_attempt(service, job.id, 1)
        assert worker["gpus"] == 2 and worker["slurm_job_id"], worker
        pilot = slurm.scontrol_job(worker["slurm_job_id"])
        assert pilot["JobName"] == "lathe-pilot-a100+g2", pilot
        assert "gpu:2" in (pilot.get("TresPerNode", "") + pilot.get("Gres", "")), pilot
        assert pilot["NodeList"] == "n1", pilot

        view = service.request("GET", f"/v1/fine_tuning/jobs/{too_big.id}", key=client.api_key).json()
        assert view["status"] == "queued", view
        reason = (view.get("lathe") or {}).get("pending_reason") or ""
        assert "8" in reason and "a100" in reason, view
        events = [e.message for e in client.fine_tuning.jobs.list_events(too_big.id, limit=100).data]
        assert any(m.startswith("Waiting:") and "8" in m for m in events), events
        # The autoscaler submitted nothing for it, and says so in its pass log.
        wait_until(lambda: "unservable=1" in autoscaler.process.tail(400), 30,
                   lambda: f"the autoscaler never reported the 8-GPU job as unservable\n{autoscaler.process.tail(40)}")
        assert not autoscaler.pilots("a100+g8"), "a pilot larger than the pool allows was submitted"
    finally:
        client.fine_tuning.jobs.cancel(too_big.id)
