"""Faults a cluster sees: a worker killed outright, Redis wiped, a worker preempted with SIGTERM.
Postgres is the truth: every job still finishes once, from its last committed checkpoint, with
the same losses as a run that nobody disturbed."""

from __future__ import annotations

import pytest

from lathe_service import (LONG_EPOCHS, assert_complete_curve, create_job, metrics_curve, redis_cli, wait_for_status,
                           wait_for_step, wait_until)

pytestmark = pytest.mark.service

LOSS_RTOL = 1e-4


def test_killed_worker_job_resumes_on_another_and_matches_an_uninterrupted_run(service, client, api_key,
                                                                               training_file_id):
    reference = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=11)
    wait_for_status(client, reference.id, "succeeded")
    straight = metrics_curve(service, api_key, reference.id)
    total = assert_complete_curve(straight, reference.id)

    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=11)
    first_worker = service.only_worker()
    committed = wait_until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 120,
                           f"job {job.id} committed no checkpoint", interval=0.05)
    first_worker.kill()
    assert client.fine_tuning.jobs.retrieve(job.id).status in {"running", "queued"}, "the job ended before the kill"
    seen_step = max(c.step_number for c in committed)
    assert seen_step < total, "the job had trained every step before the kill; the test proved nothing"

    service.start_worker()
    wait_for_status(client, job.id, "succeeded", timeout=180)

    attempts = service.attempts(job.id)
    assert [a["number"] for a in attempts] == [1, 2], f"expected two attempts, got {attempts}"
    killed, resumed = attempts
    assert killed["outcome"] != "succeeded" and resumed["outcome"] == "succeeded", attempts
    assert killed["worker_id"] != resumed["worker_id"], "the job was not resumed by the other worker"
    last_committed = max(service.checkpoint_steps(job.id, attempt=1))
    assert resumed["resumed_from_step"] == last_committed >= seen_step, (
        f"attempt 2 resumed from step {resumed['resumed_from_step']}, "
        f"the last checkpoint committed by attempt 1 is step {last_committed}")
    service.assert_attempts_never_overlap(job.id)

    curve = metrics_curve(service, api_key, job.id)
    assert assert_complete_curve(curve, job.id) == total
    for interrupted, uninterrupted in zip(curve, straight):
        assert interrupted["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=LOSS_RTOL), (
            f"step {interrupted['step']}: resumed run {interrupted['train_loss']}, "
            f"uninterrupted {uninterrupted['train_loss']} (resumed from step {last_committed})")


def test_redis_flushall_with_jobs_queued_and_running_loses_and_repeats_none(service, client, api_key,
                                                                            training_file_id):
    jobs = [create_job(client, training_file_id, seed=20 + i) for i in range(4)]
    wait_for_step(service, client, api_key, jobs[0].id, 1)
    statuses = [client.fine_tuning.jobs.retrieve(j.id).status for j in jobs]
    assert "running" in statuses and "queued" in statuses, f"wanted one running and some queued, got {statuses}"

    assert redis_cli("FLUSHALL") == "OK"

    for job in jobs:
        wait_for_status(client, job.id, "succeeded", timeout=240)
    for job in jobs:
        outcomes = [(a["number"], a["outcome"]) for a in service.attempts(job.id)]
        assert outcomes == [(1, "succeeded")], f"job {job.id} ran as {outcomes}, not once"
        assert_complete_curve(metrics_curve(service, api_key, job.id), job.id)


def test_sigterm_releases_the_job_without_spending_a_retry(service, client, api_key, training_file_id):
    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=30)
    worker = service.only_worker()
    seen_step = wait_for_step(service, client, api_key, job.id, 1)
    worker.terminate()
    assert worker.wait(timeout=60) == 0, f"the worker exited {worker.popen.returncode} after SIGTERM"

    queued = wait_for_status(client, job.id, "queued", timeout=15)
    assert queued.fine_tuned_model is None
    assert service.job_column(job.id, "retries") == "0", "preemption was counted as a failed try"
    assert [a["outcome"] for a in service.attempts(job.id)] == ["preempted"]

    service.start_worker()
    wait_for_status(client, job.id, "succeeded", timeout=180)
    assert service.job_column(job.id, "retries") == "0"
    attempts = service.attempts(job.id)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "preempted"), (2, "succeeded")], attempts
    second = attempts[1]
    saved = service.checkpoint_steps(job.id, attempt=1)
    assert saved and second["resumed_from_step"] == max(saved) >= seen_step, (
        f"attempt 2 resumed from {second['resumed_from_step']}; attempt 1 committed {saved}, "
        f"had reported step {seen_step} before SIGTERM")
    service.assert_attempts_never_overlap(job.id)
    total = assert_complete_curve(metrics_curve(service, api_key, job.id), job.id)
    assert seen_step < total, "the job had trained every step before SIGTERM; the test proved nothing"
