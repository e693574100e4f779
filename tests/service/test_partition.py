"""A worker cut off from the controller (network partition, frozen host): it must stop training
on its own before its lease can run out, so that when the controller hands the job to another
worker, two attempts never train at once — and the job still finishes, with the losses of an
undisturbed run."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from lathe_service import (assert_complete_curve, create_job, metrics_curve,
                           wait_for_status, wait_for_step, wait_until)
from tcp_proxy import CuttableProxy

pytestmark = pytest.mark.service


def pg_time(text: str) -> datetime:
    """A timestamptz as psql prints it: `2026-12-01 13:34:05.123+00`."""
    text = text.replace(" ", "T")
    return datetime.fromisoformat(text + ":00" if re.search(r"[+-]\d\d$", text) else text)


def log_time(line: str) -> datetime:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))


def test_a_partitioned_worker_stops_before_its_job_moves_on(service, client, api_key, training_file_id):
    service.only_worker().stop()
    proxy = CuttableProxy("127.0.0.1", service.grpc_port)
    try:
        isolated = service.start_worker(grpc_port=proxy.port)
        # Unpacked rows and many epochs: training outlasts the worker's trust in its lease.
        job = create_job(client, training_file_id, n_epochs=40, seed=70, extra={"packing": False})
        wait_until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 120,
                   f"job {job.id} committed no checkpoint", interval=0.05)
        proxy.cut()
        rescuer = service.start_worker()
        wait_for_status(client, job.id, "succeeded", timeout=240)

        attempts = service.attempts(job.id)
        assert [a["number"] for a in attempts] == [1, 2], attempts
        log = (service.log_dir / f"{isolated.name}.stderr.log").read_text()
        stopped = [line for line in log.splitlines() if "no lease renewal from the controller in time" in line]
        assert stopped, f"the partitioned worker never stopped on its own:\n{log[-3000:]}"
        second_started = pg_time(attempts[1]["started_at"])
        assert log_time(stopped[0]) < second_started, (
            f"attempt 2 started at {second_started} while the partitioned worker trained until {stopped[0]}")
        assert_complete_curve(metrics_curve(service, api_key, job.id), job.id)
        assert rescuer.alive()
    finally:
        proxy.cut()
