"""Dispatch as a user sees it: priorities, jobs that do not fit any worker, the live event
stream, and the Prometheus metrics operators scrape."""

from __future__ import annotations

import json
import re
import time

import pytest

from lathe_service import LONG_EPOCHS, create_job, wait_for_status, wait_for_step, wait_until

pytestmark = pytest.mark.service


def test_a_higher_priority_job_is_dispatched_before_older_ones(service, client, api_key, training_file_id):
    busy = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=40)
    wait_for_step(service, client, api_key, busy.id, 1)
    low = create_job(client, training_file_id, seed=41)
    high = create_job(client, training_file_id, seed=42, extra={"priority": 10})
    assert client.fine_tuning.jobs.retrieve(high.id).status == "queued"
    client.fine_tuning.jobs.cancel(busy.id)
    wait_for_status(client, low.id, "succeeded")
    wait_for_status(client, high.id, "succeeded")
    started = {job.id: service.attempts(job.id)[0]["started_at"] for job in (low, high)}
    assert started[high.id] < started[low.id], f"priority 10 started after priority 0: {started}"


def test_a_job_needing_more_gpu_memory_than_any_worker_stays_queued(service, client, training_file_id):
    big = create_job(client, training_file_id, extra={"gpu_memory_gb": 640})
    small = create_job(client, training_file_id, seed=3)
    wait_for_status(client, small.id, "succeeded")
    time.sleep(2)  # several claim polls of the idle worker
    big_now = client.fine_tuning.jobs.retrieve(big.id)
    assert big_now.status == "queued" and service.attempts(big.id) == [], (
        f"a CPU worker took a job asking for 640 GB: {big_now.status}, attempts {service.attempts(big.id)}")
    client.fine_tuning.jobs.cancel(big.id)


def test_live_event_stream_sends_every_event_then_ends(service, client, api_key, training_file_id):
    job = create_job(client, training_file_id, seed=50)
    resp = service.request("GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", key=api_key, timeout=180)
    assert resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"), resp.headers
    blocks = [b for b in resp.body.decode().split("\n\n") if b.strip()]
    events, ended = [], False
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line and not line.startswith(":"))
        if fields.get("event", "").strip() == "end":
            ended = True
        elif "data" in fields:
            events.append(json.loads(fields["data"]))
    assert ended, "the stream did not end after the job finished"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was streamed twice"
    listed = {e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)}
    assert set(ids) == listed, "the stream and the event list disagree"
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == sorted(steps) and steps, "metrics events are not streamed oldest first"
    assert events[-1]["message"] == "The job has successfully completed"


def test_prometheus_metrics_show_jobs_workers_and_latencies(service, client, api_key, training_file_id):
    job = create_job(client, training_file_id, seed=60)
    wait_for_status(client, job.id, "succeeded")
    time.sleep(1.5)  # one reconciler pass refreshes the gauges
    resp = service.request("GET", "/metrics")
    assert resp.status == 200
    text = resp.body.decode()

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} ([0-9.eE+-]+)$", text, re.MULTILINE)
        assert match, f"{pattern} not in /metrics:\n{text[:2000]}"
        return float(match.group(1))

    assert value(r'lathe_jobs\{status="succeeded"\}') >= 1
    assert value(r'lathe_workers\{state="live"\}') >= 1
    assert value(r"lathe_claim_latency_seconds_count") >= 1
    assert value(r"lathe_metric_points_ingested_total") >= 1
    assert value(r'lathe_http_request_duration_seconds_count\{method="GET",route="/v1/fine_tuning/jobs/\{id\}",status="200"\}') >= 1
    assert "ftjob-" not in re.sub(r"lathe_job_\w+\{job_id=\"ftjob-\w+\"\}.*", "", text), "a job id leaked into a label"



def test_a_job_whose_file_was_deleted_fails_with_a_clear_code_not_as_poison(service, client, api_key,
                                                                            training_file_id, train_file):
    busy = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=80)
    wait_for_step(service, client, api_key, busy.id, 1)
    with open(train_file, "rb") as f:
        doomed_file = client.files.create(file=f, purpose="fine-tune").id
    doomed = create_job(client, doomed_file, seed=81)
    client.files.delete(doomed_file)
    client.fine_tuning.jobs.cancel(busy.id)
    failed = wait_for_status(client, doomed.id, "failed", timeout=60)
    assert failed.error.code == "file_not_found", failed.error
    assert service.job_column(doomed.id, "retries") == "0"


def test_a_job_no_worker_can_take_says_why_within_seconds(service, client, training_file_id):
    big = create_job(client, training_file_id, batch_size=8, extra={"gpus": 8})

    def reason():
        return (client.fine_tuning.jobs.retrieve(big.id).model_extra or {}).get("lathe", {}).get("pending_reason")

    said = wait_until(reason, 15, f"job {big.id} got no pending_reason")
    assert said == "no live worker of pool \"default\" offers 8 GPU(s) on 1 node(s); the largest offers 1 GPU(s) on 1 node(s)", said
    warnings = [e.message for e in client.fine_tuning.jobs.list_events(big.id, limit=50) if e.level == "warn"]
    assert warnings.count(f"Waiting: {said}. The job stays queued until such a worker joins.") == 1, warnings
    assert client.fine_tuning.jobs.retrieve(big.id).status == "queued"
    # Demand is counted in GPUs too: what a scaler needs to start a pilot of that shape.
    demand = service.admin("demand?pool=default")["data"][0]
    assert demand["gpus_asked"] >= 8 and demand["queued_jobs"] >= 1, demand
    metrics = service.request("GET", "/metrics").body.decode()
    gpus = [l for l in metrics.splitlines() if l.startswith('lathe_pool_gpus_asked{pool="default"}')]
    assert gpus and float(gpus[0].split()[-1]) >= 8, gpus
    client.fine_tuning.jobs.cancel(big.id)
