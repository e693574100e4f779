"""Two controllers on one database (issue 9): one leads the reconciler at a time, and `kill -9`
of the controller a job's worker talks to loses nothing: the API keeps answering through the
other, the worker's stream moves over (a TCP failover stands in for the load balancer), and the
job finishes with every step exactly once."""

from __future__ import annotations

import pytest

from lathe_service import (LONG_EPOCHS, Service, assert_complete_curve, create_job, find_lathe_bin, make_client,
                           metrics_curve, wait_for_status, wait_for_step, wait_until)
from tcp_proxy import CuttableProxy

pytestmark = pytest.mark.service

POOL = "replicas"


def replica(service: Service, tmp_path_factory, name: str) -> Service:
    """Another controller on the session's database, Redis prefix and data directory."""
    other = Service(find_lathe_bin(), tmp_path_factory.mktemp(name))
    other.env = dict(service.env)
    other.data_dir, other.models_root = service.data_dir, service.models_root
    other.start_controller()
    return other


def leaders(*controllers: Service) -> list[Service]:
    """The controllers whose last word on the reconciler lock is that they hold it."""
    def leads(c: Service) -> bool:
        said = [line for line in c.controller.stderr_log.read_text().splitlines() if "reconciler leadership changed" in line]
        return bool(said) and said[-1].endswith("leader=true")
    return [c for c in controllers if leads(c)]


def test_kill_9_of_one_controller_mid_job_the_other_serves_and_the_job_finishes_once(service, api_key, training_file_id,
                                                                                       tmp_path_factory):
    first, second = replica(service, tmp_path_factory, "replica-1"), replica(service, tmp_path_factory, "replica-2")
    proxy = CuttableProxy("127.0.0.1", first.grpc_port, second.grpc_port)
    worker = service.start_worker(grpc_port=proxy.port, pools=POOL)
    try:
        client_first, client_second = make_client(first, api_key), make_client(second, api_key)
        job = create_job(client_first, training_file_id, n_epochs=LONG_EPOCHS, pool=POOL)
        wait_for_step(first, client_first, api_key, job.id, 2)
        first.controller.kill()

        # The API answers through the survivor at once, and the job goes on there.
        assert client_second.fine_tuning.jobs.retrieve(job.id).status in {"running", "queued"}
        done = wait_for_status(client_second, job.id, "succeeded", timeout=240)
        assert done.fine_tuned_model, done
        total = assert_complete_curve(metrics_curve(second, api_key, job.id), job.id)
        assert total > 2, "the job had finished before the kill; the test proved nothing"
        service.assert_attempts_never_overlap(job.id)

        # The session's controller, the killed one and the survivor share one lock: at most one
        # of the live ones leads, and one does.
        live = [c for c in (service, second) if c.controller.alive()]
        wait_until(lambda: len(leaders(*live)) == 1, 30, lambda: f"{len(leaders(*live))} live controllers lead the reconciler")
    finally:
        worker.stop()
        proxy.cut()
        for controller in (first, second):
            controller.controller.stop()
