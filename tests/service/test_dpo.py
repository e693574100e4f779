"""DPO through the official `openai` SDK: a preference file in OpenAI's format uploads, a
`method: {type: "dpo"}` job trains it on a worker, its first loss is ln 2 and falls, the metrics
carry the rewards, and the adapter it returns prefers the preferred answers of pairs it never
saw (measured with transformers + peft against the base model: the implicit reward margin)."""

from __future__ import annotations

import json
import math

import openai
import pytest

from lathe_service import MODEL, example_rows, metrics_curve, preference_rows, wait_for_status, write_jsonl

pytestmark = pytest.mark.service

BETA = 0.1
@pytest.fixture(scope="module")
def pairs_file_id(client, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", preference_rows(example_rows(24)))
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def create_dpo_job(client, file_id: str, **hyperparameters):
    return client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, seed=0, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": BETA, "n_epochs": 3, "batch_size": 4,
                                                            **hyperparameters}}},
        extra_body={"learning_rate": 5e-3, "max_seq_length": 256})


def test_a_dpo_job_trains_from_ln2_and_its_adapter_prefers_the_preferred_answers(service, client, api_key,
                                                                                  pairs_file_id, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = create_dpo_job(client, pairs_file_id)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == BETA
    job = wait_for_status(client, job.id, "succeeded", timeout=300)
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:")

    curve = metrics_curve(service, api_key, job.id)
    assert curve[0]["train_loss"] == pytest.approx(math.log(2), rel=1e-5), "step 1: policy = reference, loss ln 2"
    assert curve[-1]["train_loss"] < 0.5 * curve[0]["train_loss"], f"the DPO loss did not fall: {curve}"
    assert curve[-1]["rewards_margin"] > 0 and curve[-1]["rewards_accuracy"] == 1.0, curve[-1]
    events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert events and "rewards_margin" in events[0].data and "train_loss" in events[0].data

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for file_id in job.result_files:
        (adapter_dir / client.files.retrieve(file_id).filename).write_bytes(client.files.content(file_id).read())
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(service.models_root / MODEL)
    base = AutoModelForCausalLM.from_pretrained(service.models_root / MODEL, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()

    held_out = [json.loads(r) for r in preference_rows(example_rows(32)[24:])]
    margins = [implicit_reward_margin(tuned, tokenizer, pair) for pair in held_out]
    right = sum(m > 0 for m in margins)
    assert right >= 7, f"the adapter prefers the preferred answer on {right}/8 unseen pairs: margins {margins}"
    assert sum(margins) / len(margins) > 0.1, f"mean implicit reward margin {sum(margins) / len(margins)}"


def implicit_reward_margin(tuned, tokenizer, pair) -> float:
    """β·((log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))), the reference being the base
    (the adapter disabled), each log-probability summed over the answer and its end-of-turn token."""
    import torch

    prompt = pair["input"]["messages"]
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores = []
    for answer in (pair["preferred_output"][0], pair["non_preferred_output"][0]):
        text = tokenizer.apply_chat_template(prompt + [answer], tokenize=False)
        assert text.startswith(prefix)
        prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(text[len(prefix):], add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[: answer_ids.index(end) + 1]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            policy = answer_logp(tuned(input_ids=ids).logits, ids, len(prompt_ids))
            with tuned.disable_adapter():
                reference = answer_logp(tuned(input_ids=ids).logits, ids, len(prompt_ids))
        scores.append(policy - reference)
    return BETA * (scores[0] - scores[1])


def answer_logp(logits, ids, start: int) -> float:
    logps = logits[0, start - 1:-1].log_softmax(-1)
    return logps.gather(-1, ids[0, start:].unsqueeze(-1)).sum().item()


def test_preference_files_are_checked_at_upload_and_matched_to_the_method(client, tmp_path, pairs_file_id,
                                                                          training_file_id):
    rows = preference_rows(example_rows(12))
    bad = json.loads(rows[1])
    bad["non_preferred_output"][0]["role"] = "user"
    rows[1] = json.dumps(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with open(path, "rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=f, purpose="fine-tune")
    message = refused.value.body["message"]
    assert "line 2" in message and "non_preferred_output[0]: must be an assistant message" in message, message

    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=MODEL, training_file=pairs_file_id)
    assert refused.value.body["param"] == "training_file"
    assert "preference pairs train with method.type dpo" in refused.value.body["message"]

    with pytest.raises(openai.BadRequestError) as refused:
        create_dpo_job(client, training_file_id)
    assert "dpo reads preference pairs" in refused.value.body["message"]

    with pytest.raises(openai.BadRequestError) as refused:
        create_dpo_job(client, pairs_file_id, beta=3)
    assert refused.value.body["param"] == "method.dpo.hyperparameters.beta"
