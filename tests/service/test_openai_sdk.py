"""The official `openai` SDK, unchanged, against Lathe: files, jobs, pagination, events, checkpoints,
cancel, pause/resume, and a finished job whose adapter downloads and loads in `peft`."""

from __future__ import annotations

import csv
import io
import time

import pytest

from lathe_service import (LONG_EPOCHS, MODEL, PARKED_POOL, assert_complete_curve, create_job,
                           download_result_files, list_all, metrics_curve, wait_for_status, wait_for_step)

pytestmark = pytest.mark.service

RESULT_FILENAMES = {"step_metrics.csv", "adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def finished_job(client, training_file_id):
    """One job trained to the end, shared by the tests that read what a finished job offers."""
    job = create_job(client, training_file_id, n_epochs=2, seed=3, suffix="cve")
    return wait_for_status(client, job.id, "succeeded", timeout=180)


def test_uploaded_file_is_listed_retrieved_and_downloaded_unchanged(client, train_file, training_file_id):
    content = train_file.read_bytes()
    uploaded = client.files.retrieve(training_file_id)
    assert uploaded.id.startswith("file-")
    assert uploaded.object == "file"
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("train.jsonl", len(content), "fine-tune")
    assert uploaded.status == "processed"
    assert uploaded.created_at > 1_600_000_000, "created_at must be Unix seconds"
    assert training_file_id in {f.id for f in list_all(client.files.list())}
    assert client.files.content(training_file_id).read() == content


def test_job_list_pages_two_at_a_time_and_auto_paginates(client, training_file_id):
    created = [create_job(client, training_file_id, seed=i, pool=PARKED_POOL) for i in range(5)]
    job = created[0]
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.model, job.training_file, job.seed) == (MODEL, training_file_id, 0)
    assert job.status in {"validating_files", "queued"}
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    assert job.fine_tuned_model is None and job.finished_at is None and job.result_files == []

    first_page = client.fine_tuning.jobs.list(limit=2)
    assert len(first_page.data) == 2 and first_page.has_more is True
    assert [j.id for j in first_page.data] == [created[-1].id, created[-2].id], "newest first"

    listed = list_all(client.fine_tuning.jobs.list(limit=2))  # fails on an id seen twice
    ids = [j.id for j in listed]
    assert {j.id for j in created} <= set(ids), "auto-pagination lost a job"
    created_at = [j.created_at for j in listed]
    assert created_at == sorted(created_at, reverse=True), "the list is not newest first across pages"
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id


def test_cancelling_a_queued_job(client, training_file_id):
    job = create_job(client, training_file_id, pool=PARKED_POOL)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    after = client.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.finished_at is not None and after.fine_tuned_model is None


def test_cancelling_a_running_job_stops_its_training_within_seconds(service, client, api_key, training_file_id):
    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=1)
    wait_for_step(service, client, api_key, job.id, 1)
    client.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_for_status(client, job.id, "cancelled", timeout=20)
    assert cancelled.fine_tuned_model is None and cancelled.result_files == []

    reported = len(metrics_curve(service, api_key, job.id))
    time.sleep(2)
    assert len(metrics_curve(service, api_key, job.id)) == reported, "the worker kept training a cancelled job"
    total = metrics_curve(service, api_key, job.id)[-1]["total_steps"]
    assert reported < total, "the job had finished all its steps; cancel proved nothing"


def test_pause_then_resume_finishes_the_job(service, client, api_key, training_file_id):
    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=2)
    wait_for_step(service, client, api_key, job.id, 1)
    assert client.fine_tuning.jobs.pause(job.id).status in {"running", "paused"}
    wait_for_status(client, job.id, "paused", timeout=60)
    time.sleep(2)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused", "a paused job was picked up again"
    paused_at = len(metrics_curve(service, api_key, job.id))

    assert client.fine_tuning.jobs.resume(job.id).status in {"queued", "running"}
    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    total = assert_complete_curve(metrics_curve(service, api_key, job.id), job.id)
    assert paused_at < total, "the job had finished all its steps before the pause; the test proved nothing"
    assert done.fine_tuned_model


def test_finished_job_names_its_model_and_result_files(client, finished_job):
    job = finished_job
    assert job.fine_tuned_model == f"ft:{MODEL}:cve:{job.id}"
    assert job.finished_at >= job.created_at
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.error is None
    files = [client.files.retrieve(file_id) for file_id in job.result_files]
    assert {f.filename for f in files} == RESULT_FILENAMES
    assert {f.purpose for f in files} == {"fine-tune-results"}


def test_metrics_events_show_the_loss_falling(client, finished_job):
    events = list_all(client.fine_tuning.jobs.list_events(finished_job.id, limit=10))
    times = [e.created_at for e in events]
    assert times == sorted(times, reverse=True), "events are not newest first"
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert len(metrics) >= 2, f"{len(metrics)} metrics events among {[e.message for e in events][:10]}"
    steps = [d["step"] for d in metrics]
    assert len(set(steps)) == len(steps), f"a step was reported twice: {steps}"
    assert steps[-1] <= metrics[-1]["total_steps"]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"], (
        f"the loss did not fall: step {steps[0]} {metrics[0]['train_loss']} -> "
        f"step {steps[-1]} {metrics[-1]['train_loss']}")


def test_checkpoints_carry_their_step_and_metrics(service, client, api_key, finished_job):
    total = metrics_curve(service, api_key, finished_job.id)[-1]["total_steps"]
    checkpoints = list_all(client.fine_tuning.jobs.checkpoints.list(finished_job.id))
    # The worker checkpoints every 2 steps and the job at its first epoch's end (2 epochs); the
    # newest 3 are kept, as OpenAI keeps them.
    written = [s for s in range(1, total) if s % 2 == 0 or s == total // 2]
    steps = sorted(c.step_number for c in checkpoints)
    assert steps == written[-3:], f"checkpoint steps {steps}, expected the newest 3 of {written}"
    for ckpt in checkpoints:
        assert ckpt.id.startswith("ftckpt_") and ckpt.object == "fine_tuning.job.checkpoint"
        assert ckpt.fine_tuning_job_id == finished_job.id
        assert ckpt.metrics.step == ckpt.step_number
        assert ckpt.metrics.train_loss is not None and ckpt.metrics.train_loss > 0
        assert ckpt.fine_tuned_model_checkpoint


def test_native_metrics_endpoint_has_the_whole_curve(service, client, api_key, finished_job):
    curve = metrics_curve(service, api_key, finished_job.id)
    total = assert_complete_curve(curve, finished_job.id)
    events = list_all(client.fine_tuning.jobs.list_events(finished_job.id, limit=100))
    from_events = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics"}
    assert set(from_events) <= set(range(1, total + 1)), "metrics events name steps the curve does not have"
    for point in curve:
        if point["step"] in from_events:
            assert point["train_loss"] == pytest.approx(from_events[point["step"]], rel=1e-6), point
        assert point["learning_rate"] is not None and point["tokens_seen"] > 0, point
    tokens_seen = [p["tokens_seen"] for p in curve]
    assert tokens_seen == sorted(tokens_seen), "tokens_seen went backwards"


def test_the_metrics_route_pages_with_after_and_limit(service, client, api_key, finished_job):
    whole = metrics_curve(service, api_key, finished_job.id)
    path = f"/fine_tuning/jobs/{finished_job.id}/metrics"  # under the client's base URL, /v1
    pages, after = [], None
    while True:
        query = f"?limit=3{'' if after is None else f'&after={after}'}"
        page = client.get(path + query, cast_to=object)
        pages.append(page)
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert all(len(p["data"]) <= 3 for p in pages) and len(pages) == -(-len(whole) // 3), [len(p["data"]) for p in pages]
    assert [p for page in pages for p in page["data"]] == whole
    assert pages[0]["last_id"] == str(whole[2]["step"])
    import openai
    with pytest.raises(openai.BadRequestError) as bad:
        client.get(path + "?after=step-two", cast_to=object)
    assert bad.value.body["param"] == "after", bad.value.body
    with pytest.raises(openai.BadRequestError):
        client.get(path + "?limit=0", cast_to=object)


def test_models_lists_the_base_model_and_the_fine_tuned_one(client, finished_job):
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models, f"{MODEL} missing from {sorted(models)}"
    assert finished_job.fine_tuned_model in models, f"{finished_job.fine_tuned_model} missing from {sorted(models)}"
    assert {m.object for m in models.values()} == {"model"}


def test_adapter_from_result_files_loads_in_peft(service, client, api_key, finished_job, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    adapter_dir = download_result_files(client, finished_job, tmp_path / "adapter")
    assert {p.name for p in adapter_dir.iterdir()} == RESULT_FILENAMES

    curve = metrics_curve(service, api_key, finished_job.id)
    rows = list(csv.DictReader(io.StringIO((adapter_dir / "step_metrics.csv").read_text())))
    assert [int(r["step"]) for r in rows] == [p["step"] for p in curve], "step_metrics.csv lacks steps"
    assert float(rows[-1]["train_loss"]) == pytest.approx(curve[-1]["train_loss"], rel=1e-3)

    lora_b = {k: t for k, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert lora_b, "the adapter has no lora_B tensors"
    untrained = [k for k, t in lora_b.items() if t.abs().max().item() == 0]
    assert not untrained, f"lora_B still zero after training: {untrained[:4]}"

    base = AutoModelForCausalLM.from_pretrained(service.models_root / MODEL, dtype=torch.float32).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
        tuned_logits = tuned(input_ids=input_ids).logits
    assert torch.isfinite(tuned_logits).all()
    assert (tuned_logits - base_logits).abs().max().item() > 1e-3, "the downloaded adapter changes nothing"


def test_a_qlora_job_trains_on_a_4bit_base_and_its_adapter_loads_in_peft(service, client, api_key, training_file_id,
                                                                          tmp_path):
    """`quantization: "nf4"` end to end: the worker holds the base in NF4 (docs/qlora.md), the loss
    falls, and the adapter it returns is a plain PEFT adapter for the unquantized base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = create_job(client, training_file_id, n_epochs=2, seed=5, suffix="qlora", extra={"quantization": "nf4"})
    job = wait_for_status(client, job.id, "succeeded", timeout=180)
    curve = metrics_curve(service, api_key, job.id)
    assert curve[-1]["train_loss"] < curve[0]["train_loss"], f"QLoRA loss did not fall: {curve}"
    adapter_dir = download_result_files(client, job, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(service.models_root / MODEL, dtype=torch.float32).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
    assert (after - before).abs().max().item() > 1e-3, "the QLoRA adapter changes nothing"


def test_a_deleted_fine_tuned_model_is_gone_and_a_base_model_cannot_be_deleted(client, training_file_id):
    import openai
    job = wait_for_status(client, create_job(client, training_file_id, seed=31, suffix="gone").id, "succeeded", timeout=180)
    model = job.fine_tuned_model
    assert model in {m.id for m in client.models.list()}

    deleted = client.models.delete(model)
    assert (deleted.id, deleted.object, deleted.deleted) == (model, "model", True)
    assert model not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(model)
    # The job keeps its history and still names the model it made, as OpenAI's do.
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == model

    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.models.delete(MODEL)
    assert refused.value.body["code"] == "model_not_deletable", refused.value.body
    assert MODEL in {m.id for m in client.models.list()}


def test_files_list_takes_openais_limit_order_after_and_purpose(client, train_file):
    import openai
    ids = []
    for _ in range(3):
        with open(train_file, "rb") as f:
            ids.append(client.files.create(file=f, purpose="fine-tune").id)
    newest_first = [f.id for f in client.files.list(purpose="fine-tune", limit=10000).data]
    assert [i for i in newest_first if i in ids] == ids[::-1], newest_first
    oldest_first = [f.id for f in client.files.list(purpose="fine-tune", order="asc", limit=10000).data]
    assert [i for i in oldest_first if i in ids] == ids, oldest_first
    assert oldest_first == newest_first[::-1]
    # Pages in ascending order, two at a time, end where they began.
    first = client.files.list(purpose="fine-tune", order="asc", limit=2)
    assert [f.id for f in first.data] == oldest_first[:2] and first.has_more
    second = client.files.list(purpose="fine-tune", order="asc", limit=2, after=first.data[-1].id)
    assert [f.id for f in second.data] == oldest_first[2:4]
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.list(order="sideways")
    assert bad.value.body["param"] == "order", bad.value.body


def test_jobs_list_keeps_only_the_jobs_with_the_metadata_asked_for(client, training_file_id):
    tag = f"run-{time.time_ns()}"
    red = [create_job(client, training_file_id, pool=PARKED_POOL, extra={"metadata": {"sweep": tag, "team": "red"}}) for _ in range(2)]
    blue = create_job(client, training_file_id, pool=PARKED_POOL, extra={"metadata": {"sweep": tag, "team": "blue"}})
    try:
        listed = lambda metadata: [j.id for j in client.fine_tuning.jobs.list(metadata=metadata, limit=100).data]  # noqa: E731
        assert listed({"sweep": tag, "team": "red"}) == [j.id for j in reversed(red)]
        assert listed({"sweep": tag}) == [blue.id, *(j.id for j in reversed(red))]
        assert listed({"sweep": tag, "team": "green"}) == []
        # Pages of a filtered list follow the filter.
        page = client.fine_tuning.jobs.list(metadata={"sweep": tag}, limit=1)
        assert [j.id for j in page.data] == [blue.id] and page.has_more
        rest = client.fine_tuning.jobs.list(metadata={"sweep": tag}, limit=10, after=blue.id)
        assert [j.id for j in rest.data] == [j.id for j in reversed(red)]
    finally:
        for job in (*red, blue):
            client.fine_tuning.jobs.cancel(job.id)


def test_openai_s_auto_sizing_rate_display_estimated_finish_and_plain_error_words(service, client, api_key,
                                                                                training_file_id):
    import openai
    # "auto" as OpenAI sizes it: 24 examples × 3 epochs < 100, so 100 // 24 = 4 epochs; a batch
    # of about 0.2 % of the examples, at least 1.
    auto = client.fine_tuning.jobs.create(model=MODEL, training_file=training_file_id, extra_body={"pool": PARKED_POOL},
                                          hyperparameters={"n_epochs": "auto", "batch_size": "auto"})
    assert (auto.hyperparameters.n_epochs, auto.hyperparameters.batch_size) == (4, 1)
    assert auto.hyperparameters.learning_rate_multiplier == 1.0

    # A native learning_rate is shown as itself, not as a multiplier nobody gave.
    job = create_job(client, training_file_id, n_epochs=LONG_EPOCHS, seed=41)
    shown = job.to_dict()["hyperparameters"]
    assert shown.get("learning_rate") == 5e-3 and "learning_rate_multiplier" not in shown, shown

    # A running job says when it will finish, from its pace so far.
    wait_for_step(service, client, api_key, job.id, 3)
    running = client.fine_tuning.jobs.retrieve(job.id)
    now = time.time()
    assert running.status == "running", running.status
    assert running.estimated_finish is not None and now - 5 <= running.estimated_finish <= now + 3600, \
        (running.estimated_finish, now)
    listed = {j.id: j for j in client.fine_tuning.jobs.list(limit=20).data}
    assert listed[job.id].estimated_finish is not None
    client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).estimated_finish is None

    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training_file_id)
    message = refused.value.body["message"]
    assert message.startswith('model: "no-such-model" is not a base model') and "ModelName(" not in message, message
