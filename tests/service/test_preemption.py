"""Priority preemption as users see it: an urgent job takes the only worker from a running
low-priority one, which checkpoints, goes back to the queue without spending a retry, resumes
and ends with the very losses of a run nobody disturbed; no preemption before the minimum run
time; `--preemption off` turns it off; a preemption asked for before a controller restart is
carried out after it."""

from __future__ import annotations

import time

import pytest

from lathe_service import (LONG_EPOCHS, Service, assert_complete_curve, create_job, find_lathe_bin, make_client,
                           metrics_curve, require_postgres_and_redis, wait_for_status, wait_for_step)

pytestmark = pytest.mark.service

LOSS_RTOL = 1e-4
MIN_RUN_SECONDS = 1
# Long enough (tens of steps, several seconds) that the job is mid-run when it is preempted.
EPOCHS = 10 * LONG_EPOCHS
SUITE_LIMITS = ("--rate-limit-per-minute", "100000", "--auth-failures-per-minute", "100000")


@pytest.fixture(scope="module")
def preempting(tmp_path_factory, train_file):
    """One controller that preempts after 1 s of run time, one worker, a project and its file."""
    require_postgres_and_redis()
    service = Service(find_lathe_bin(), tmp_path_factory.mktemp("preemption"))
    try:
        service.init_model()
        service.start_controller(extra_args=(*SUITE_LIMITS, "--preempt-after-seconds", str(MIN_RUN_SECONDS)))
        service.start_worker()
        key = service.create_key("preemption")
        client = make_client(service, key)
        with open(train_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        yield service, key, client, file_id
    finally:
        service.shutdown()


def events(client, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)]


def test_an_urgent_job_preempts_and_the_preempted_job_resumes_with_identical_losses(preempting):
    service, key, client, file_id = preempting
    reference = create_job(client, file_id, n_epochs=EPOCHS, seed=90)
    wait_for_status(client, reference.id, "succeeded")
    straight = metrics_curve(service, key, reference.id)
    total = assert_complete_curve(straight, reference.id)

    low = create_job(client, file_id, n_epochs=EPOCHS, seed=90)
    wait_for_step(service, client, key, low.id, 1)
    urgent = create_job(client, file_id, seed=91, extra={"priority": 100})
    asked = time.monotonic()
    wait_for_status(client, urgent.id, "succeeded", timeout=180)

    first = service.attempts(low.id)[0]
    assert first["outcome"] == "preempted", service.attempts(low.id)
    urgent_start = service.attempts(urgent.id)[0]["started_at"]
    assert first["ended_at"] <= urgent_start, f"the urgent job started at {urgent_start} before the low one ended at {first['ended_at']}"
    assert any(f"Preempted by job {urgent.id} (priority 100 > 0)" in m for m in events(client, low.id)), events(client, low.id)
    assert any(f"Preempting job {low.id} (priority 0)" in m for m in events(client, urgent.id)), events(client, urgent.id)

    wait_for_status(client, low.id, "succeeded", timeout=240)
    attempts = service.attempts(low.id)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "preempted"), (2, "succeeded")], attempts
    assert service.job_column(low.id, "retries") == "0", "preemption was counted as a failed try"
    saved = service.checkpoint_steps(low.id, attempt=1)
    assert saved and attempts[1]["resumed_from_step"] == max(saved) < total, (
        f"attempt 2 resumed from {attempts[1]['resumed_from_step']}; attempt 1 committed {saved} of {total} steps")
    service.assert_attempts_never_overlap(low.id)

    curve = metrics_curve(service, key, low.id)
    assert assert_complete_curve(curve, low.id) == total
    for resumed, undisturbed in zip(curve, straight):
        assert resumed["train_loss"] == pytest.approx(undisturbed["train_loss"], rel=LOSS_RTOL), (
            f"step {resumed['step']}: preempted run {resumed['train_loss']}, undisturbed {undisturbed['train_loss']}")

    metrics = service.request("GET", "/metrics").body.decode()
    assert 'lathe_preemptions_total{pool="default"} 1' in metrics, [l for l in metrics.splitlines() if "preempt" in l]
    assert time.monotonic() - asked < 180


def test_no_preemption_before_the_minimum_run_time_and_none_when_off(preempting):
    service, key, client, file_id = preempting
    # Off: a controller that never preempts, on the same database and worker.
    service.controller.stop()
    service.start_controller(extra_args=(*SUITE_LIMITS, "--preemption", "off", "--preempt-after-seconds", "1"))
    try:
        busy = create_job(client, file_id, n_epochs=EPOCHS, seed=92)
        wait_for_step(service, client, key, busy.id, 1)
        urgent = create_job(client, file_id, seed=93, extra={"priority": 100})
        time.sleep(4)  # four reconciler passes past the minimum run time
        assert client.fine_tuning.jobs.retrieve(urgent.id).status == "queued"
        assert [a["outcome"] for a in service.attempts(busy.id)] == [None], service.attempts(busy.id)
        client.fine_tuning.jobs.cancel(busy.id)
        wait_for_status(client, urgent.id, "succeeded")
    finally:
        service.controller.stop()
        service.start_controller(extra_args=(*SUITE_LIMITS, "--preempt-after-seconds", "30"))

    # On, with 30 s of minimum run time: a job 5 s into its run is left alone.
    busy = create_job(client, file_id, n_epochs=EPOCHS, seed=94)
    wait_for_step(service, client, key, busy.id, 1)
    urgent = create_job(client, file_id, seed=95, extra={"priority": 100})
    time.sleep(4)
    assert [a["outcome"] for a in service.attempts(busy.id)] == [None], service.attempts(busy.id)
    assert client.fine_tuning.jobs.retrieve(urgent.id).status == "queued"
    for job in (busy, urgent):
        client.fine_tuning.jobs.cancel(job.id)


def test_a_preemption_asked_for_before_a_controller_restart_is_carried_out_after_it(preempting):
    service, key, client, file_id = preempting
    # A controller that never preempts by itself (an hour of minimum run time): the request is
    # the one the previous controller kept on the job row before it went down.
    service.controller.stop()
    service.start_controller(extra_args=(*SUITE_LIMITS, "--preempt-after-seconds", "3600"))
    reference = create_job(client, file_id, n_epochs=50, batch_size=2, seed=96)
    wait_for_status(client, reference.id, "succeeded")
    straight = metrics_curve(service, key, reference.id)

    low = create_job(client, file_id, n_epochs=50, batch_size=2, seed=96)
    wait_for_step(service, client, key, low.id, 1)
    urgent = create_job(client, file_id, seed=97, extra={"priority": 100})
    # What a controller records when it preempts, then dies (kill -9) before the worker hears of
    # it. The worker trains on meanwhile, buffering its reports; the next controller is up well
    # within the worker's lease.
    service.controller.kill()
    service.psql(f"UPDATE jobs SET preempt_requested_at = now(), preempted_for = '{urgent.id}' WHERE id = '{low.id}'")
    service.start_controller(extra_args=(*SUITE_LIMITS, "--preempt-after-seconds", "3600"))

    wait_for_status(client, urgent.id, "succeeded", timeout=180)
    wait_for_status(client, low.id, "succeeded", timeout=240)
    attempts = service.attempts(low.id)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "preempted"), (2, "succeeded")], attempts
    assert service.job_column(low.id, "retries") == "0", "the hand-back was counted as a failed try"
    service.assert_attempts_never_overlap(low.id)
    curve = metrics_curve(service, key, low.id)
    assert assert_complete_curve(curve, low.id) == assert_complete_curve(straight, reference.id)
    for resumed, undisturbed in zip(curve, straight):
        assert resumed["train_loss"] == pytest.approx(undisturbed["train_loss"], rel=LOSS_RTOL), (
            f"step {resumed['step']}: preempted across a restart {resumed['train_loss']}, undisturbed {undisturbed['train_loss']}")
