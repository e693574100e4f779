"""Data parallel through the service: a job asking for `gpus: 2` runs as two ranks on a worker
that offers two (`--gpus 2`; CPU ranks here, cuda:0 and cuda:1 on a GPU node). Its batch_size
is the global batch, so its loss curve equals the same job on one rank, and its adapter loads
in PEFT. A worker offering fewer GPUs never claims it; a job whose batch or GPUs do not split
is refused at create, naming the field. A killed rank fails the attempt and the job resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest

from lathe_service import (MODEL, create_job, download_result_files, metrics_curve, wait_for_status, wait_for_step,
                           wait_until)



def test_a_2_gpu_job_runs_as_two_ranks_and_learns_what_one_rank_learns(service, client, api_key, training_file_id, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The session's plain worker offers one GPU: it must leave the 2-GPU job alone.
    two = create_job(client, training_file_id, n_epochs=2, pool="dp", extra={"gpus": 2}, batch_size=8)
    # fp32: bf16 rounds the two summation orders apart at its own 1e-3 level.
    service.start_worker(pools="dp", extra_args=("--gpus", "2", "--dtype", "fp32"))
    one = create_job(client, training_file_id, n_epochs=2, pool="dp", extra={"gpus": 1}, batch_size=8)
    two, one = wait_for_status(client, two.id, "succeeded", timeout=300), wait_for_status(client, one.id, "succeeded", timeout=300)
    assert service.psql(f"SELECT gpus FROM jobs WHERE id = '{two.id}'") == [["2"]]

    events = [e.message for e in client.fine_tuning.jobs.list_events(two.id, limit=100)]
    assert any("Data parallel: 2 ranks" in m for m in events), events
    curve_two, curve_one = metrics_curve(service, api_key, two.id), metrics_curve(service, api_key, one.id)
    assert [p["step"] for p in curve_two] == [p["step"] for p in curve_one] and len(curve_one) >= 2
    for a, b in zip(curve_two, curve_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), f"step {a['step']}: 2 ranks {a['train_loss']!r}, 1 rank {b['train_loss']!r}"

    adapter_dir = download_result_files(client, two, tmp_path / "adapter")
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(service.models_root / MODEL, dtype=torch.float32).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
        tuned_logits = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=input_ids).logits
    assert (tuned_logits - base_logits).abs().max().item() > 1e-3, "the 2-rank adapter changes nothing"


def test_gpus_must_split_the_batch_and_the_nodes_at_create(client, training_file_id):
    with pytest.raises(openai.BadRequestError) as uneven:
        create_job(client, training_file_id, extra={"gpus": 3}, batch_size=4)
    assert uneven.value.body["param"] == "gpus"
    with pytest.raises(openai.BadRequestError) as nodes:
        create_job(client, training_file_id, extra={"gpus": 3, "nodes": 2}, batch_size=6)
    assert nodes.value.body["param"] == "nodes"
    assert "do not split evenly over 2 nodes" in nodes.value.body["message"]


def _descendants(pid: int) -> list[int]:
    """Children of every thread of `pid` (the worker spawns ranks from its training thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def test_a_killed_rank_fails_the_attempt_and_the_job_resumes_to_the_unbroken_curve(service, client, api_key, training_file_id):
    worker = service.start_worker(pools="dp-kill", extra_args=("--gpus", "2", "--dtype", "fp32"))
    unbroken = create_job(client, training_file_id, n_epochs=6, pool="dp-kill", extra={"gpus": 2}, batch_size=8)
    unbroken = wait_for_status(client, unbroken.id, "succeeded", timeout=300)

    job = create_job(client, training_file_id, n_epochs=6, pool="dp-kill", extra={"gpus": 2}, batch_size=8)
    wait_for_step(service, client, api_key, job.id, 5)
    ranks = wait_until(lambda: _descendants(worker.pid) or None, 30, "the worker's child rank")
    os.kill(ranks[0], signal.SIGKILL)
    wait_for_status(client, job.id, "succeeded", timeout=300)

    attempts = service.attempts(job.id)
    assert attempts[0]["outcome"] == "crashed", attempts
    assert len(attempts) >= 2 and attempts[-1]["resumed_from_step"], f"the job did not resume from a checkpoint: {attempts}"
    reason = service.psql(f"SELECT reason FROM attempts WHERE job_id = '{job.id}' AND number = 1")[0][0]
    assert "rank" in reason, reason
    assert not _descendants(worker.pid), "a rank outlived its attempt"
    assert [(p["step"], p["train_loss"]) for p in metrics_curve(service, api_key, job.id)] == \
        [(p["step"], p["train_loss"]) for p in metrics_curve(service, api_key, unbroken.id)]
