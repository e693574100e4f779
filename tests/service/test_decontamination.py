"""A job that asks for decontamination: the worker checks the training file against CTIBench
before training, reports the counts as a job event, and trains without the overlapping rows."""

from __future__ import annotations

import csv
import json

import openai
import pytest

from lathe_service import CTIBENCH, MODEL, Service, create_job, error_body, example_rows, find_lathe_bin, wait_for_status

pytestmark = pytest.mark.service

LEAKED = 8


def leaked_rows(n: int) -> list[str]:
    """Chat rows whose user turn is a CTI-RCM item's prompt, as a careless training set has them."""
    with open(CTIBENCH / "cti-rcm.tsv", newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f, delimiter="\t"))[:n]
    return [json.dumps({"messages": [{"role": "user", "content": item["Prompt"]},
                                     {"role": "assistant", "content": item["GT"]}]}) for item in items]


def test_overlapping_examples_are_reported_and_dropped_before_training(client, tmp_path):
    path = tmp_path / "leaky.jsonl"
    path.write_text("\n".join(example_rows(16) + leaked_rows(LEAKED)) + "\n")
    with open(path, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = create_job(client, file_id, seed=90, extra={"decontaminate": {"benchmarks": ["cti-rcm"]}})
    assert job.model_extra["lathe"]["decontaminate"] == {"benchmarks": ["cti-rcm"], "keep": False}
    wait_for_status(client, job.id, "succeeded")

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    report = [e for e in events if e.message.startswith("Decontamination against cti-rcm")]
    assert len(report) == 1, [e.message for e in events]
    data = report[0].data
    assert data["training_examples"] == 16 + LEAKED
    assert data["overlapping"] == LEAKED and data["by_description"] == LEAKED and data["dropped"] is True, data
    started = next(e for e in events if e.message.startswith("Training started"))
    assert "16 examples" in started.message, started.message


def test_an_unknown_benchmark_to_protect_is_refused_naming_the_field(client, training_file_id):
    with pytest.raises(openai.BadRequestError) as raised:
        create_job(client, training_file_id, extra={"decontaminate": {"benchmarks": ["mmlu"]}})
    error = error_body(raised.value)
    assert error["param"] == "decontaminate.benchmarks" and "mmlu" in error["message"], error


def test_decontamination_needs_the_benchmark_data_at_create_and_names_each_benchmark_once(service, client, api_key,
                                                                                         training_file_id, tmp_path_factory):
    with pytest.raises(openai.BadRequestError) as raised:
        create_job(client, training_file_id, extra={"decontaminate": {"benchmarks": ["cti-rcm", "cti-mcq", "cti-rcm"]}})
    error = error_body(raised.value)
    assert error["param"] == "decontaminate.benchmarks" and "cti-rcm is named twice" in error["message"], error

    # A controller without the CTIBench data: refused at create, not accepted and crashed later.
    bare = Service(find_lathe_bin(), tmp_path_factory.mktemp("no-ctibench"))
    bare.env = dict(service.env)
    bare.data_dir, bare.models_root = service.data_dir, service.models_root
    bare.eval_data_dir = tmp_path_factory.mktemp("empty") / "missing"
    bare.start_controller()
    try:
        body = {"model": MODEL, "training_file": training_file_id, "decontaminate": {"benchmarks": ["cti-rcm"]}}
        resp = bare.request("POST", "/v1/fine_tuning/jobs", key=api_key, json_body=body)
        assert resp.status == 400, resp.body[:300]
        error = resp.json()["error"]
        assert (error["param"], error["code"]) == ("decontaminate.benchmarks", "evaluation_data_unavailable"), error
    finally:
        bare.controller.stop()
