"""Fleet enrolment and demand (issue 10): many worker instances share one fleet secret, each with
an identity of its own, revocable one by one; the admin endpoints show demand per pool and the
workers, and the controller's `lathe_pool_demand` gauge follows the queue. Each test uses a pool
of its own, so the session's worker never takes these jobs."""

from __future__ import annotations

import re

import pytest

from lathe_service import create_job, wait_for_status, wait_until

pytestmark = pytest.mark.service


def fleet_workers(service, pool: str, state: str = "live") -> list[dict]:
    return [w for w in service.admin("workers?limit=1000")["data"] if pool in w["pools"] and w["state"] == state]


def test_two_instances_share_one_fleet_secret_and_revoking_one_stops_only_it(service, client, training_file_id):
    first = service.start_worker(pools="fleet-x", token=service.fleet_secret)
    second = service.start_worker(pools="fleet-x", token=service.fleet_secret, extra_args=("--pod-name", "lathe-worker-7d9f"))
    try:
        enrolled = wait_until(lambda: (w := fleet_workers(service, "fleet-x")) and len(w) == 2 and w, 60,
                              lambda: f"two instances did not both enrol: {service.admin('workers')['data']}")
        assert len({w["id"] for w in enrolled}) == 2, enrolled
        assert len({w["fleet_id"] for w in enrolled}) == 1 and enrolled[0]["fleet_id"], enrolled
        by_name = {w["name"]: w["id"] for w in enrolled}
        assert set(by_name) == {first.name, second.name}, by_name
        assert {w["name"]: w["pod_name"] for w in enrolled} == {first.name: None, second.name: "lathe-worker-7d9f"}

        service.lathe("admin", "revoke-worker", by_name[first.name])
        assert first.wait(timeout=30) != 0, "the revoked instance kept running"
        assert "revoked worker token" in first.tail(200), first.tail()
        assert second.alive(), f"revoking one instance stopped the other\n{second.tail()}"

        job = create_job(client, training_file_id, pool="fleet-x")
        wait_for_status(client, job.id, "succeeded", timeout=180)
        assert [a["worker_id"] for a in service.attempts(job.id)] == [by_name[second.name]]
        assert [w["id"] for w in fleet_workers(service, "fleet-x")] == [by_name[second.name]]
        assert [w["id"] for w in fleet_workers(service, "fleet-x", "revoked")] == [by_name[first.name]]
    finally:
        for worker in (first, second):
            if worker.alive():
                worker.stop()


def test_a_wrong_fleet_secret_is_refused(service):
    worker = service.start_worker(pools="fleet-y", token="fleet-not-the-secret-at-all")
    assert worker.wait(timeout=30) != 0
    assert "unknown or revoked worker token" in worker.tail(200), worker.tail()


def pool_gauge(service, pool: str) -> float:
    text = service.request("GET", "/metrics").body.decode()
    match = re.search(rf'^lathe_pool_demand{{pool="{pool}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_demand_per_pool_rises_with_queued_jobs_and_falls_when_they_end(service, client, training_file_id):
    demand = lambda: service.admin("demand?pool=demand-pool")["data"]  # noqa: E731
    assert demand() == [{"object": "pool_demand", "pool": "demand-pool", "demand": 0, "queued_jobs": 0, "running_jobs": 0,
                         "queued_evaluations": 0, "running_evaluations": 0, "gpu_memory_gb_asked": 0,
                         "gpus_asked": 0, "nodes_asked": 0, "oldest_queued_seconds": 0, "workers": 0,
                         "draining_workers": 0, "shapes": []}]
    jobs = [create_job(client, training_file_id, pool="demand-pool", extra={"gpu_memory_gb": 24}) for _ in range(3)]
    assert demand()[0]["demand"] == 3 and demand()[0]["queued_jobs"] == 3
    assert demand()[0]["gpu_memory_gb_asked"] == 72
    assert (demand()[0]["gpus_asked"], demand()[0]["nodes_asked"]) == (3, 3)
    big = create_job(client, training_file_id, pool="demand-pool", extra={"gpus": 4})
    assert demand()[0]["shapes"] == [{"gpus": 1, "nodes": 1, "queued": 3, "running": 0},
                                     {"gpus": 4, "nodes": 1, "queued": 1, "running": 0}]
    jobs.append(big)
    wait_until(lambda: pool_gauge(service, "demand-pool") == 4, 20, "lathe_pool_demand did not reach 4")
    assert any(d["pool"] == "demand-pool" for d in service.admin("demand")["data"])

    for job in jobs:
        client.fine_tuning.jobs.cancel(job.id)
    assert demand()[0]["demand"] == 0
    wait_until(lambda: pool_gauge(service, "demand-pool") == 0, 20, "lathe_pool_demand did not fall to 0")
    text = service.request("GET", "/metrics").body.decode()
    assert 'lathe_pool_demand{pool="demand-pool"} 0' in text, "the pool's series vanished instead of reading 0"


def test_the_admin_endpoints_need_the_admin_token(service, api_key):
    for key in (None, api_key, "wrong"):
        resp = service.request("GET", "/v1/admin/demand", key=key)
        assert resp.status == 401, (key, resp.status, resp.body[:200])
    bad = service.request("GET", "/v1/admin/demand?pool=Not%20A%20Pool", key=service.admin_token)
    assert bad.status == 400 and bad.json()["error"]["param"] == "pool", bad.body[:300]
