"""Postgres briefly down: the API answers 503 with the error envelope (no hang, no 500), the
worker keeps training and buffers its reports, and once Postgres is back the job finishes with
every step of its curve, in one attempt."""

from __future__ import annotations

import time

import pytest

from lathe_service import (LONG_EPOCHS, PG_HOST, PG_PORT, Service, assert_complete_curve, create_job,
                           find_lathe_bin, make_client, metrics_curve, require_postgres_and_redis, wait_for_status, wait_until,
                           wait_for_step)
from tcp_proxy import CuttableProxy

pytestmark = pytest.mark.service

OUTAGE_SECONDS = 3


def service_behind_proxy(tmp_path, **controller_args):
    """A controller and a worker whose Postgres is reached through a proxy a test can cut."""
    require_postgres_and_redis()
    proxy = CuttableProxy(PG_HOST, PG_PORT)
    svc = Service(find_lathe_bin(), tmp_path, pg_port=proxy.port)
    try:
        svc.init_model()
        svc.start_controller(**controller_args)
        svc.start_worker()
        yield svc, proxy
    finally:
        proxy.restore() if proxy._listener is None else None
        svc.shutdown()
        proxy.cut()


@pytest.fixture
def proxied_service(tmp_path):
    yield from service_behind_proxy(tmp_path)


def test_postgres_outage_gives_503_and_loses_nothing(proxied_service, train_file):
    service, proxy = proxied_service
    key = service.create_key("outage")
    client = make_client(service, key)
    with open(train_file, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = create_job(client, file_id, n_epochs=LONG_EPOCHS, seed=5)
    wait_for_step(service, client, key, job.id, 1)

    proxy.cut()
    cut_at = time.monotonic()
    answers = []
    while time.monotonic() - cut_at < OUTAGE_SECONDS:
        started = time.monotonic()
        resp = service.request("GET", f"/v1/fine_tuning/jobs/{job.id}", key=key, timeout=15)
        answers.append((resp.status, time.monotonic() - started, resp.json() if resp.status != 200 else None))
    proxy.restore()

    assert answers and all(status == 503 for status, _, _ in answers), f"during the outage: {answers}"
    envelope = answers[0][2]["error"]
    assert envelope["type"] == "server_error" and envelope["code"] == "service_unavailable", envelope
    assert max(elapsed for _, elapsed, _ in answers) < 10, f"requests hung during the outage: {answers}"

    done = wait_for_status(client, job.id, "succeeded", timeout=240)
    assert done.trained_tokens and done.trained_tokens > 0
    assert_complete_curve(metrics_curve(service, key, job.id), job.id)
    outcomes = [(a["number"], a["outcome"]) for a in service.attempts(job.id)]
    assert outcomes == [(1, "succeeded")], f"the outage cost an attempt: {outcomes}"


LONG_LEASE_SECONDS = 12


@pytest.fixture
def proxied_service_long_lease(tmp_path):
    """As `proxied_service`, with a lease long enough for the first heartbeat after the cut to be
    answered before the worker stops trusting its lease (the pool waits 5 s for a connection
    before it reports Postgres unreachable; the suite's 8 s lease leaves too little margin)."""
    yield from service_behind_proxy(tmp_path, lease_seconds=LONG_LEASE_SECONDS)


def test_an_outage_longer_than_the_lease_costs_no_attempt_and_no_retry(proxied_service_long_lease, train_file):
    """Postgres cut for two leases: the worker keeps training (its heartbeats are answered
    "database unavailable"), the reconciler extends the leases for the outage when Postgres is
    back, and the job finishes in its first attempt with every step of its curve."""
    service, proxy = proxied_service_long_lease
    key = service.create_key("long-outage")
    client = make_client(service, key)
    with open(train_file, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    # Long enough to be still training when Postgres comes back: the reconciler's first pass then
    # finds a lease that expired during the outage, and must extend it rather than requeue it.
    job = create_job(client, file_id, n_epochs=50, seed=6)
    wait_for_step(service, client, key, job.id, 1)

    outage = 2 * LONG_LEASE_SECONDS
    proxy.cut()
    time.sleep(outage)
    worker = service.only_worker()
    assert worker.alive(), f"the worker died during the outage\n{worker.tail()}"
    proxy.restore()
    log = lambda: service.controller.stderr_log.read_text() + service.controller.stdout_log.read_text()
    wait_until(lambda: "running leases extended" in log(), 30, "the reconciler to extend the leases after the outage")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running", "the job ended during the outage: nothing was tested"

    done = wait_for_status(client, job.id, "succeeded", timeout=600)
    assert done.trained_tokens and done.trained_tokens > 0
    assert_complete_curve(metrics_curve(service, key, job.id), job.id)
    outcomes = [(a["number"], a["outcome"]) for a in service.attempts(job.id)]
    assert outcomes == [(1, "succeeded")], f"a {outage} s outage cost an attempt: {outcomes}"
    assert service.job_column(job.id, "retries") == "0"
