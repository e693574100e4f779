"""A worker that gives its GPU back (issue 10's lifecycle): `--exit-when-idle`, `--max-jobs`, and
`lathe admin drain-worker`, on the real controller. Each test uses a pool of its own so the
session's worker never takes these jobs."""

from __future__ import annotations

import signal

import pytest

from lathe_service import LONG_EPOCHS, create_job, wait_for_status, wait_until

pytestmark = pytest.mark.service


def test_an_idle_worker_exits_cleanly_after_its_idle_limit(service):
    worker = service.start_worker(pools="idle-pool", extra_args=("--exit-when-idle", "2"))
    assert worker.wait(timeout=40) == 0, worker.tail()
    assert "worker leaving" in worker.tail(200) and "idle for" in worker.tail(200), worker.tail()
    # It said so: it stops counting as supply at once, not when its heartbeats are missed.
    (row,) = [w for w in service.admin("workers?limit=1000")["data"] if w["name"] == worker.name]
    assert row["state"] == "left", row
    assert service.admin("demand?pool=idle-pool")["data"][0]["workers"] == 0


def test_a_worker_with_max_jobs_1_runs_one_job_and_exits(service, client, training_file_id):
    job = create_job(client, training_file_id, pool="one-shot")
    worker = service.start_worker(pools="one-shot", extra_args=("--max-jobs", "1"))
    wait_for_status(client, job.id, "succeeded", timeout=180)
    assert worker.wait(timeout=40) == 0, worker.tail()
    assert "--max-jobs 1" in worker.tail(200), worker.tail()


def test_a_drained_worker_finishes_its_job_claims_no_other_and_exits(service, client, training_file_id):
    worker = service.start_worker(pools="drain-pool", extra_args=("--exit-when-idle", "3"))
    first = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, pool="drain-pool")
    wait_for_status(client, first.id, "running", timeout=120)
    service.lathe("admin", "drain-worker", worker.name)
    second = create_job(client, training_file_id, pool="drain-pool")
    wait_for_status(client, first.id, "succeeded", timeout=180)
    assert worker.wait(timeout=60) == 0, worker.tail()
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued", "a draining worker claimed a new job"
    client.fine_tuning.jobs.cancel(second.id)
    wait_until(lambda: client.fine_tuning.jobs.retrieve(second.id).status == "cancelled", 30, "the queued job did not cancel")


def test_sigusr1_drains_a_worker_it_finishes_its_job_claims_no_other_and_exits(service, client, training_file_id):
    worker = service.start_worker(pools="usr1-pool")
    first = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, pool="usr1-pool")
    wait_for_status(client, first.id, "running", timeout=120)
    worker.popen.send_signal(signal.SIGUSR1)
    second = create_job(client, training_file_id, pool="usr1-pool")
    wait_for_status(client, first.id, "succeeded", timeout=180)
    assert worker.wait(timeout=60) == 0, worker.tail()
    assert "drained (SIGUSR1)" in worker.tail(200), worker.tail()
    assert [a["outcome"] for a in service.attempts(first.id)] == ["succeeded"], "the drained job did not finish where it ran"
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued", "a draining worker claimed a new job"
