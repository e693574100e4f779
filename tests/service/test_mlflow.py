"""Runs in a real MLflow tracking server (`mlflow server`, SQLite store, artifacts served), as an
operator configures it (`lathe-controller --mlflow-tracking-uri`): a job with an `mlflow`
integration becomes a run with its params, every metric point at its step and its result files;
MLflow down while the job trains loses nothing once it is back; `lathe jobs compare` shows two
jobs side by side. Without a configured server, or asking for W&B, the job is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import openai
import pytest

from lathe_service import (MODEL, Process, Service, example_rows, find_lathe_bin, free_port, make_client,
                           metrics_curve, require_postgres_and_redis, wait_for_status, wait_until, write_jsonl)

pytestmark = pytest.mark.service

MLFLOW = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mlflow"


class MlflowServer:
    """`mlflow server` on a free port over a SQLite store that outlives a stop and a restart."""

    def __init__(self, workdir: Path, log_dir: Path):
        if not MLFLOW.is_file():
            pytest.fail("mlflow is not installed: scripts/test.sh installs it (scripts/requirements-test.txt)",
                        pytrace=False)
        self.workdir, self.log_dir, self.port = workdir, log_dir, free_port()
        self.process: Process | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.process = Process("mlflow", [
            str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
        ], {"PATH": f"{MLFLOW.parent}:/usr/bin:/bin", "HOME": str(self.workdir)}, self.workdir, self.log_dir)
        wait_until(self.healthy, 120, lambda: f"mlflow server never answered /health\n{self.process.tail(40)}", 0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        if self.process is not None:
            self.process.stop()
            self.process = None

    def api(self, path: str, body: dict | None = None) -> dict:
        url = f"{self.uri}/api/2.0/mlflow/{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                         method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(autouse=True)
def clean_slate():
    """Overrides the suite's fixture: this module runs its own controller."""
    yield


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    require_postgres_and_redis()
    workdir = tmp_path_factory.mktemp("mlflow")
    mlflow = MlflowServer(workdir, workdir)
    mlflow.start()
    svc = Service(find_lathe_bin(), tmp_path_factory.mktemp("lathe-mlflow"))
    try:
        svc.init_model()
        svc.start_controller(extra_args=("--rate-limit-per-minute", "100000", "--auth-failures-per-minute", "100000",
                                         "--mlflow-tracking-uri", mlflow.uri))
        svc.start_worker()
        client = make_client(svc, svc.create_key("mlflow"))
        with open(write_jsonl(workdir / "train.jsonl", example_rows(24)), "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        yield svc, mlflow, client, file_id
    finally:
        mlflow.stop()
        svc.shutdown()


def tracked_job(client, file_id: str, experiment: str, run_name: str, learning_rate: float):
    return client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, seed=0, hyperparameters={"n_epochs": 2, "batch_size": 4},
        integrations=[{"type": "mlflow", "mlflow": {"experiment": experiment, "run_name": run_name,
                                                     "tags": {"team": "secops"}}}],
        extra_body={"learning_rate": learning_rate, "max_seq_length": 256})


def the_run(mlflow: MlflowServer, experiment: str, run_name: str, finished: bool = True) -> dict | None:
    try:
        found = mlflow.api(f"experiments/get-by-name?experiment_name={experiment}")
    except OSError:
        return None
    runs = mlflow.api("runs/search", {"experiment_ids": [found["experiment"]["experiment_id"]]}).get("runs", [])
    runs = [r for r in runs if r["info"].get("run_name") == run_name]
    assert len(runs) <= 1, f"{len(runs)} runs named {run_name}: a run was made twice"
    if runs and (not finished or runs[0]["info"]["status"] == "FINISHED"):
        return runs[0]
    return None


def assert_run_holds_the_job(svc, mlflow, client, job, run):
    key = client.api_key
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert (params["job_id"], params["n_epochs"], params["batch_size"]) == (job.id, "2", "4"), params
    assert float(params["learning_rate"]) == job.to_dict()["hyperparameters"]["learning_rate"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["team"] == "secops" and tags["lathe.job_id"] == job.id

    curve = metrics_curve(svc, key, job.id)
    history = mlflow.api(f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=train_loss&max_results=10000")
    logged = sorted((m["step"], m["value"]) for m in history["metrics"])
    assert [s for s, _ in logged] == [p["step"] for p in curve], "MLflow lacks steps (or has some twice)"
    for (step, value), point in zip(logged, curve):
        assert value == pytest.approx(point["train_loss"], rel=1e-6), f"step {step}"

    listed = mlflow.api(f"artifacts/list?run_id={run['info']['run_id']}")
    names = {f["path"] for f in listed.get("files", [])}
    assert {"adapter_model.safetensors", "adapter_config.json", "step_metrics.csv"} <= names, names


def test_a_job_is_logged_to_mlflow_and_an_outage_during_it_loses_nothing(tracked, tmp_path):
    svc, mlflow, client, file_id = tracked
    first = wait_for_status(client, tracked_job(client, file_id, "cve-cwe", "lr-5e-3", 5e-3).id, "succeeded")
    run = wait_until(lambda: the_run(mlflow, "cve-cwe", "lr-5e-3"), 60, "the run of the first job in MLflow")
    assert_run_holds_the_job(svc, mlflow, client, first, run)

    # MLflow goes down before the second job starts and comes back after it ended.
    mlflow.stop()
    second = tracked_job(client, file_id, "cve-cwe", "lr-1e-3", 1e-3)
    assert second.integrations[0].type == "mlflow"
    second = wait_for_status(client, second.id, "succeeded")
    mlflow.start()
    run = wait_until(lambda: the_run(mlflow, "cve-cwe", "lr-1e-3"), 120, "the second job's run once MLflow is back")
    assert_run_holds_the_job(svc, mlflow, client, second, run)

    compared = svc.lathe("jobs", "compare", first.id, second.id, "--api-url", svc.v1_url, "--api-key", client.api_key)
    lines = compared.splitlines()
    assert lines[0].split() == [first.id, second.id]
    assert any(line.startswith("learning_rate") and "0.005" in line and "0.001" in line and line.endswith("*")
               for line in lines), compared
    assert any(line.split()[:1] == ["1"] and len(line.split()) >= 3 for line in lines), compared


def test_mlflow_needs_a_configured_server_and_wandb_is_refused_saying_what_works(client, training_file_id):
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=MODEL, training_file=training_file_id,
                                       integrations=[{"type": "mlflow", "mlflow": {"experiment": "x"}}])
    assert refused.value.body["param"] == "integrations"
    assert "--mlflow-tracking-uri" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=MODEL, training_file=training_file_id,
                                       integrations=[{"type": "wandb", "wandb": {"project": "x"}}])
    assert refused.value.body["code"] == "unsupported_parameter"
    assert "MLflow" in refused.value.body["message"]
