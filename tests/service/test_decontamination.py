"""A job that asks for decontamination: the worker checks the training file against CTIBench
before training, reports the counts as a job event, and trains without the overlapping rows."""

from __future__ import annotations

import csv
import json

import openai
import pytest

from lathe_service import CTIBENCH, create_job, error_body, example_rows, wait_for_status

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
