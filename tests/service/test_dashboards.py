"""The Grafana dashboard (deploy/grafana/dashboards/lathe.json) against `lathe up` running a job
(issue 10): every metric name a Prometheus panel queries is in the /metrics text `lathe up`
serves (its workers' included), and every Postgres panel's SQL returns rows for that job.

`lathe up` runs here on a database and Redis prefix of its own; the job has a validation file,
so validation loss is reported live too, and an evaluation runs so the evaluations panels have
data. Metric names are collected over the job's life (some exist only while it runs, the
attempt counter only once it ended)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lathe_service import (CTIBENCH, EXAMPLES, LONG_EPOCHS, MODEL, Process, Service, create_job, example_rows,
                           find_lathe_bin, make_client, require_postgres_and_redis, wait_for_status, wait_until,
                           write_jsonl)

pytestmark = pytest.mark.service

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "lathe.json"


@pytest.fixture(autouse=True)
def clean_slate():
    """Overrides the suite's fixture: this module runs `lathe up`, not the session's service."""
    yield


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    require_postgres_and_redis()
    svc = Service(find_lathe_bin(), tmp_path_factory.mktemp("lathe-up"))
    try:
        svc.init_model()
        svc.controller = Process("lathe-up", [
            str(svc.bin), "up", "--http-listen", f"127.0.0.1:{svc.http_port}", "--grpc-listen", f"127.0.0.1:{svc.grpc_port}",
            "--data-dir", str(svc.data_dir), "--models-root", str(svc.models_root), "--eval-data-dir", str(CTIBENCH),
            "--workers", "1", "--device", "cpu", "--threads", "1", "--checkpoint-every", "2",
            "--reconcile-seconds", "1", "--heartbeat-seconds", "1", "--admin-token", svc.admin_token,
        ], svc.env, svc.workdir, svc.log_dir)
        wait_until(lambda: svc.controller.alive() and _ready(svc), 90, lambda: f"lathe up never got ready\n{svc.controller.tail()}")
        yield svc
    finally:
        svc.shutdown()


def _ready(svc) -> bool:
    try:
        return svc.request("GET", "/readyz", timeout=2).status == 200
    except OSError:
        return False


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("type") != "row"]


def prometheus_metric_names() -> set[str]:
    names = set()
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\blathe_[a-z_]+\b", target.get("expr") or ""))
    return names


def sampled_names(text: str) -> set[str]:
    """Names with at least one sample line (not NaN) in an OpenMetrics text."""
    return {m.group(1) for m in re.finditer(r"^(lathe_[a-z_]+)(?:\{[^}]*\})? (\S+)", text, re.M) if m.group(2) != "NaN"}


def test_every_dashboard_query_has_data_against_lathe_up_running_a_job(up, tmp_path):
    key = up.create_key("dashboards")
    client = make_client(up, key)
    with open(write_jsonl(tmp_path / "train.jsonl", example_rows(24)), "rb") as f:
        training = client.files.create(file=f, purpose="fine-tune").id
    with open(EXAMPLES.parent / "validation.jsonl", "rb") as f:
        validation = client.files.create(file=f, purpose="fine-tune").id
    job = create_job(client, training, n_epochs=LONG_EPOCHS, validation_file=validation)
    evaluation = up.request("POST", "/v1/evaluations", key=key,
                            json_body={"model": MODEL, "benchmark": "cti-mcq", "limit": 2, "max_new_tokens": 4})
    assert evaluation.status == 200, evaluation.body[:500]

    wanted = prometheus_metric_names()
    assert {"lathe_pool_demand", "lathe_job_validation_loss", "lathe_worker_busy"} <= wanted, wanted
    seen: set[str] = set()

    def scraped_everything():
        seen.update(sampled_names(up.request("GET", "/metrics").body.decode()))
        status = client.fine_tuning.jobs.retrieve(job.id).status
        assert status not in {"failed", "cancelled"}, status
        return status == "succeeded" and wanted <= seen

    wait_until(scraped_everything, 300, lambda: f"never scraped: {sorted(wanted - seen)}", interval=0.3)

    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            sql = target.get("rawSql")
            if sql:
                rows = up.psql(sql.replace("$job_id", job.id))
                assert rows, f"panel {panel['title']!r}: its SQL returned no row for job {job.id}"
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["query"]
    assert [job.id] in up.psql(variable)
