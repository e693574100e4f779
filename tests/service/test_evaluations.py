"""Evaluations through the service: POST /v1/evaluations on the tiny model, run by the
real worker over gRPC, stored in Postgres with every item's prediction, and identical to what
`lathe eval run` computes locally on the same protocol; evaluations a job asks for run on its
fine-tuned model; bad inputs (unknown benchmark, missing data directory, malformed TSV row)
are refused at create with the field and the line."""

from __future__ import annotations

import json
import shutil

import pytest

from lathe_service import (CTIBENCH, EXAMPLES, MODEL, TERMINAL, Service, create_job, find_lathe_bin, wait_for_status,
                           wait_until)

pytestmark = pytest.mark.service

VALIDATION = EXAMPLES.parent / "validation.jsonl"


def evaluate(service, key, body: dict) -> dict:
    resp = service.request("POST", "/v1/evaluations", key=key, json_body=body)
    assert resp.status == 200, f"POST /v1/evaluations {body} answered {resp.status}: {resp.body[:800]!r}"
    return resp.json()


def get(service, key, path: str) -> dict:
    resp = service.request("GET", path, key=key)
    assert resp.status == 200, f"GET {path} answered {resp.status}: {resp.body[:800]!r}"
    return resp.json()


def wait_for_evaluation(service, key, evaluation_id: str, timeout: float = 240) -> dict:
    last = {}

    def probe():
        last["e"] = get(service, key, f"/v1/evaluations/{evaluation_id}")
        if last["e"]["status"] in TERMINAL:
            return last["e"]
        return None

    done = wait_until(probe, timeout, lambda: f"evaluation {evaluation_id} still {last['e']['status']}\n{service.log_tails()}", 0.3)
    assert done["status"] == "succeeded", f"evaluation {evaluation_id} ended {done['status']}: {done['error']}\n{service.log_tails()}"
    return done


def all_items(service, key, evaluation_id: str) -> list[dict]:
    items, after = [], None
    while True:
        page = get(service, key, f"/v1/evaluations/{evaluation_id}/items?limit=3" + (f"&after={after}" if after is not None else ""))
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def refused(service, key, body: dict, status: int = 400) -> dict:
    resp = service.request("POST", "/v1/evaluations", key=key, json_body=body)
    assert resp.status == status, f"{body} answered {resp.status}, not {status}: {resp.body[:500]!r}"
    return resp.json()["error"]


def test_an_evaluation_stores_every_item_and_matches_the_local_run(service, api_key, api_key_b, tmp_path):
    body = {"model": MODEL, "benchmark": "cti-mcq", "limit": 8, "seed": 3, "max_new_tokens": 6}
    created = evaluate(service, api_key, body)
    assert created["object"] == "evaluation" and created["id"].startswith("eval-")
    assert created["status"] in {"queued", "running"} and created["result"] is None
    protocol = created["protocol"]
    assert protocol["extraction"] == "mcq-last-line-letter" and protocol["unparsable_counts_as_wrong"] is True
    assert (protocol["shots"], protocol["limit"], protocol["mode"]) == (0, 8, "generate")

    done = wait_for_evaluation(service, api_key, created["id"])
    result = done["result"]
    items = all_items(service, api_key, created["id"])
    assert len(items) == 8 == result["items"] == done["progress"]["items_done"]
    assert result["correct"] == sum(i["correct"] for i in items)
    assert result["unparsable"] == sum(i["extracted"] is None for i in items)
    assert result["accuracy"] == pytest.approx(result["correct"] / 8)
    assert result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    assert result["adapter"] is False, "a base model got an adapter"
    assert {i["expected"] for i in items} == {"A", "B", "C", "D"}, "a stratified subset of 8 covers every answer"

    # The same protocol run locally by `lathe eval run` gives the same answer on every item.
    out = tmp_path / "local.json"
    service.lathe("eval", "run", "--model", service.models_root / MODEL, "--benchmarks", "cti-mcq", "--data-dir", CTIBENCH,
                  "--limit", 8, "--seed", 3, "--max-new-tokens", 6, "--device", "cpu", "--threads", 1, "--out", out)
    local = json.loads(out.read_text())[0]["result"]
    assert [(p["index"], p["output"]) for p in local["predictions"]] == [(i["index"], i["output"]) for i in items]
    assert local["accuracy"] == pytest.approx(result["accuracy"])

    # The same items under another protocol (likelihood of A-D), side by side with the CLI.
    likelihood = wait_for_evaluation(service, api_key, evaluate(service, api_key, dict(body, mode="likelihood"))["id"])
    assert likelihood["result"]["unparsable"] == 0, "likelihood mode always answers a letter"
    shown = service.lathe("evaluations", "compare", created["id"], likelihood["id"], "--api-url", service.v1_url, "--api-key", api_key)
    assert f"on the 8 items both evaluated" in shown and "the protocols differ" in shown, shown
    b_minus_a = likelihood["result"]["accuracy"] - result["accuracy"]
    assert f"B - A: {b_minus_a:+.4f}" in shown, shown

    listed = get(service, api_key, f"/v1/evaluations?model={MODEL}&limit=100")["data"]
    assert created["id"] in [e["id"] for e in listed]
    assert service.request("GET", f"/v1/evaluations/{created['id']}", key=api_key_b).status == 404, "another project read it"
    assert service.request("GET", f"/v1/evaluations/{created['id']}/items", key=api_key_b).status == 404


def test_a_job_evaluates_its_fine_tuned_model_when_it_succeeds(service, api_key, client, training_file_id, tmp_path):
    with open(VALIDATION, "rb") as f:
        validation_id = client.files.create(file=f, purpose="fine-tune").id
    evaluations = [
        {"benchmark": "cti-rcm", "limit": 3, "max_new_tokens": 8},
        {"benchmark": "file", "file": validation_id, "limit": 4, "max_new_tokens": 8, "extraction": "rcm-last-cwe"},
    ]
    job = create_job(client, training_file_id, seed=41, extra={"evaluations": evaluations})
    assert [e["benchmark"] for e in job.model_extra["lathe"]["evaluations"]] == ["cti-rcm", "file"]
    job = wait_for_status(client, job.id, "succeeded")

    queued = get(service, api_key, f"/v1/fine_tuning/jobs/{job.id}/evaluations")["data"]
    assert sorted(e["benchmark"] for e in queued) == ["cti-rcm", "file"]
    assert all(e["model"] == job.fine_tuned_model and e["fine_tuning_job"] == job.id for e in queued)
    for evaluation in queued:
        done = wait_for_evaluation(service, api_key, evaluation["id"])
        items = all_items(service, api_key, evaluation["id"])
        assert len(items) == done["result"]["items"] == {"cti-rcm": 3, "file": 4}[done["benchmark"]]
        assert all(i["expected"] for i in items)
        assert done["result"]["adapter"] is True, f"{done['model']} was evaluated without its adapter"

    # The worker applied the job's adapter: the same run here, on the downloaded result files,
    # answers every item the same way.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file_id in job.result_files:
        name = client.files.retrieve(file_id).filename
        if name.startswith("adapter_"):
            (adapter / name).write_bytes(client.files.content(file_id).content)
    out = tmp_path / "local.json"
    service.lathe("eval", "run", "--model", service.models_root / MODEL, "--adapter", adapter, "--benchmarks", "cti-rcm",
                  "--data-dir", CTIBENCH, "--limit", 3, "--max-new-tokens", 8, "--device", "cpu", "--threads", 1, "--out", out)
    local = [(p["index"], p["output"]) for p in json.loads(out.read_text())[0]["result"]["predictions"]]
    rcm = next(e for e in queued if e["benchmark"] == "cti-rcm")
    assert local == [(i["index"], i["output"]) for i in all_items(service, api_key, rcm["id"])]
    own = next(e for e in queued if e["benchmark"] == "file")
    assert own["protocol"]["file"] == validation_id and own["protocol"]["extraction"] == "rcm-last-cwe"
    by_model = get(service, api_key, f"/v1/evaluations?model={job.fine_tuned_model}")["data"]
    assert sorted(e["id"] for e in by_model) == sorted(e["id"] for e in queued)


def test_a_cancelled_evaluation_frees_the_worker(service, api_key):
    long = evaluate(service, api_key, {"model": MODEL, "benchmark": "cti-rcm", "limit": 400, "max_new_tokens": 64})
    wait_until(lambda: get(service, api_key, f"/v1/evaluations/{long['id']}")["status"] == "running", 60,
               "the evaluation never started")
    resp = service.request("POST", f"/v1/evaluations/{long['id']}/cancel", key=api_key)
    assert resp.status == 200 and resp.json()["status"] == "cancelled", resp.body[:300]
    again = service.request("POST", f"/v1/evaluations/{long['id']}/cancel", key=api_key)
    assert again.status == 400 and again.json()["error"]["code"] == "invalid_evaluation_state"
    # The worker learns it at its next heartbeat, stops between two batches and reports nothing.
    worker = service.only_worker()

    def stopped():
        return any(long["id"] in line and "abandoned" in line for line in worker.tail(400).splitlines())

    wait_until(stopped, 30, lambda: f"the worker did not stop the cancelled evaluation\n{worker.tail(60)}")
    short = evaluate(service, api_key, {"model": MODEL, "benchmark": "cti-mcq", "limit": 2, "max_new_tokens": 2})
    wait_for_evaluation(service, api_key, short["id"], timeout=90)
    final = get(service, api_key, f"/v1/evaluations/{long['id']}")
    assert final["status"] == "cancelled" and final["result"] is None and final["progress"]["items_done"] < 400, final
    assert get(service, api_key, f"/v1/evaluations/{long['id']}/items")["data"] == [], "a cancelled run stored items"


def test_bad_requests_name_the_field(service, api_key, client):
    error = refused(service, api_key, {"model": MODEL, "benchmark": "mmlu"})
    assert error["param"] == "benchmark" and "cti-mcq, cti-rcm, cti-rcm-2021, file" in error["message"], error
    assert refused(service, api_key, {"benchmark": "cti-mcq"})["param"] == "model"
    error = refused(service, api_key, {"model": "no-such-model", "benchmark": "cti-mcq"})
    assert (error["param"], error["code"]) == ("model", "model_not_found"), error
    assert refused(service, api_key, {"model": MODEL, "benchmark": "file"})["param"] == "file"
    assert refused(service, api_key, {"model": MODEL, "benchmark": "cti-rcm", "mode": "likelihood"})["param"] == "mode"
    assert refused(service, api_key, {"model": MODEL, "benchmark": "cti-mcq", "limit": "all"})["param"] == "limit"
    error = refused(service, api_key, {"model": MODEL, "benchmark": "cti-rcm-2021", "limit": 999, "shots": 5})
    assert error["param"] == "shots" and "only 1 items are left" in error["message"], error
    # The user's own file must hold scorable examples: a text document has no answer.
    text_file = client.files.create(file=("notes.jsonl", b'{"text": "a document"}\n' * 12), purpose="fine-tune").id
    error = refused(service, api_key, {"model": MODEL, "benchmark": "file", "file": text_file})
    assert (error["param"], error["code"]) == ("file", "invalid_file") and "1: a text document" in error["message"], error
    arithmetic = client.files.create(file=("sums.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 12), purpose="fine-tune").id
    error = refused(service, api_key, {"model": MODEL, "benchmark": "file", "file": arithmetic, "extraction": "rcm-last-cwe"})
    assert error["param"] == "extraction" and "example 1" in error["message"], error
    assert refused(service, api_key, {"model": MODEL, "benchmark": "cti-mcq", "extraction": "exact-match"})["param"] == "extraction"
    error = refused(service, api_key, {"model": MODEL, "benchmark": "file", "file": "file-AAAAAAAAAAAAAAAAAAAAAAAA"})
    assert (error["param"], error["code"]) == ("file", "file_not_found"), error
    error = refused(service, api_key, {"model": "ft:tiny-qwen3:nope:ftjob-AAAAAAAAAAAAAAAAAAAAAAAA", "benchmark": "cti-mcq"})
    assert error["code"] == "model_not_found", error


@pytest.fixture(scope="module")
def broken_data(service, tmp_path_factory):
    """A second controller on the same database whose CTIBench directory has a malformed row."""
    data = tmp_path_factory.mktemp("broken") / "ctibench"
    data.mkdir()
    shutil.copy(CTIBENCH / "cti-mcq.tsv", data / "cti-mcq.tsv")
    lines = (CTIBENCH / "cti-rcm.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = "\t".join(lines[3].split("\t")[:2]) + "\r\n"  # line 4 loses two of its cells
    (data / "cti-rcm.tsv").write_text("".join(lines), encoding="utf-8")
    other = Service(find_lathe_bin(), tmp_path_factory.mktemp("broken-service"))
    other.env = dict(service.env)
    other.models_root = service.models_root
    other.eval_data_dir = data
    other.start_controller()
    try:
        yield other, data
    finally:
        other.shutdown()


def test_a_malformed_row_and_a_missing_data_directory_are_refused_at_create(broken_data, api_key):
    other, data = broken_data
    error = refused(other, api_key, {"model": MODEL, "benchmark": "cti-rcm"})
    assert (error["param"], error["code"]) == ("benchmark", "invalid_benchmark_data"), error
    assert "cti-rcm.tsv:4: 2 columns, the header has 4" in error["message"], error
    assert evaluate(other, api_key, {"model": MODEL, "benchmark": "cti-mcq", "limit": 1})["status"] in {"queued", "running"}

    data.rename(data.with_name("moved"))
    error = refused(other, api_key, {"model": MODEL, "benchmark": "cti-mcq"})
    assert (error["param"], error["code"]) == ("benchmark", "evaluation_data_unavailable"), error
    assert str(data) in error["message"] and "does not exist" in error["message"], error
