"""Using the model you fine-tuned (issue 12): `/v1/chat/completions` and `/v1/completions` with the
official `openai` SDK, served by an inference worker (`lathe worker --serve`) that the controller
routes to over its Serve stream.

What a user would notice if it broke: a fine-tuned model that cannot be called; an answer that is
not what the model generates (`lathe model generate` on the same prompt is the reference, token
for token, and the prompt is the one transformers' `apply_chat_template` makes); streaming text
that differs from the whole answer; wrong token counts; another project's model being usable;
concurrent requests that are not batched together, or that get different answers than alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lathe_service import MODEL, create_job, download_result_files, metrics_curve, wait_for_status, wait_until

pytestmark = pytest.mark.service

MESSAGES = [{"role": "system", "content": "You map CVEs to CWEs."},
            {"role": "user", "content": "CVE-2021-44228: JNDI lookups in log messages allow remote code execution."}]


@pytest.fixture(scope="module")
def serving(service, api_key):
    """An inference worker of the session's controller, in fp32 (what `lathe model generate` is
    compared with), kept across this module's tests and stopped after them."""
    # Before any inference worker is connected: a clear 503 that says when to come back.
    resp = service.request("POST", "/v1/chat/completions", key=api_key,
                           json_body={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert resp.status == 503, resp.body[:300]
    assert resp.headers.get("retry-after") == "2", resp.headers
    assert resp.json()["error"]["code"] == "no_inference_worker"
    assert "lathe worker --serve" in resp.json()["error"]["message"]

    worker = service.start_worker(extra_args=("--serve", "--dtype", "fp32", "--serve-max-batch", "32"))
    worker.keep = True

    def answers():
        r = service.request("POST", "/v1/chat/completions", key=api_key,
                            json_body={"model": MODEL, "messages": MESSAGES, "max_tokens": 1})
        return r.status == 200 or None

    wait_until(answers, 60, "the inference worker to answer")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def fine_tuned(service, client, training_file_id, tmp_path_factory):
    """A LoRA job that succeeded, and its adapter downloaded as a user would."""
    job = create_job(client, training_file_id, suffix="chat")
    job = wait_for_status(client, job.id, "succeeded")
    adapter = download_result_files(client, job, tmp_path_factory.mktemp("adapter"))
    return job, adapter


def reference(service, messages, adapter, max_tokens):
    """What `lathe model generate` makes of the prompt transformers renders: (prompt ids, new ids,
    tokenizer, stop ids)."""
    from transformers import AutoTokenizer

    model_dir = service.models_root / MODEL
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    stop_ids = sorted({tok.convert_tokens_to_ids(t) for t in [tok.eos_token, "<|im_end|>", "<|endoftext|>"]
                       if t and t in tok.get_vocab()})
    args = ["model", "generate", "--model", str(model_dir), "--input-ids", ",".join(map(str, prompt)),
            "--max-new-tokens", str(max_tokens), "--stop-ids", ",".join(map(str, stop_ids)), "--dtype", "fp32"]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    out = json.loads(service.lathe(*args))
    return prompt, out["tokens"][0], tok, stop_ids


def test_a_fine_tuned_model_answers_token_for_token_as_lathe_model_generate(service, client, serving, fine_tuned):
    job, adapter = fine_tuned
    assert job.fine_tuned_model.startswith("ft:")
    answer = client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, temperature=0,
                                            max_tokens=24, logprobs=True, top_logprobs=2)
    prompt, generated, tok, stop_ids = reference(service, MESSAGES, adapter, 24)
    choice = answer.choices[0]
    assert answer.model == job.fine_tuned_model and answer.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.decode(generated, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if generated[-1] in stop_ids else "length")
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == len(generated)
    assert answer.usage.total_tokens == len(prompt) + len(generated)
    # The tokens behind the text, one by one (the end-of-turn token is not text).
    shown = [t for t in generated if t not in stop_ids]
    assert [entry.token for entry in choice.logprobs.content] == [tok.decode([t]) for t in shown]
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6, "greedy picks the most likely token"

    # The base model, served from the same shared weights, answers as `lathe model generate`
    # without the adapter, and the adapter moved the model: its log-probabilities differ.
    base = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, logprobs=True)
    _, base_generated, _, _ = reference(service, MESSAGES, None, 24)
    assert base.choices[0].message.content == tok.decode(base_generated, skip_special_tokens=True)
    assert base.usage.completion_tokens == len(base_generated)
    ft_logprobs = [entry.logprob for entry in choice.logprobs.content]
    base_logprobs = [entry.logprob for entry in base.choices[0].logprobs.content]
    assert max(abs(a - b) for a, b in zip(ft_logprobs, base_logprobs)) > 1e-3


def test_streamed_chunks_concatenate_to_the_same_answer_with_its_usage(client, serving, fine_tuned):
    job, _ = fine_tuned
    whole = client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_sampling_stop_sequences_choices_and_legacy_completions(client, serving):
    # A seed fixes a sampled answer; n choices each get their own draw.
    sampled = [client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.9, seed=7,
                                              max_tokens=12, n=3) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len({c.message.content for c in sampled[0].choices}) > 1, "three draws of 12 tokens should not all agree"
    assert 3 <= sampled[0].usage.completion_tokens <= 36

    # A stop sequence ends the text before it, with finish_reason "stop".
    free = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    cut = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()), None)
    if cut is not None:
        stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, stop=[cut])
        assert stopped.choices[0].message.content == text[:text.index(cut)]
        assert stopped.choices[0].finish_reason == "stop"

    # Legacy completions: a text prompt, 16 tokens by default.
    legacy = client.completions.create(model=MODEL, prompt="CVE-2021-44228 is", temperature=0)
    assert legacy.object == "text_completion" and legacy.choices[0].finish_reason in ("stop", "length")
    assert legacy.usage.completion_tokens <= 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="CVE-2021-44228 is", temperature=0, stream=True) if c.choices)
    assert streamed == legacy.choices[0].text


def test_another_projects_model_is_not_found_and_unknown_parameters_are_named(client, client_b, serving, fine_tuned):
    job, _ = fine_tuned
    with pytest.raises(openai.NotFoundError) as missing:
        client_b.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found"
    # Project A's own call works (the 404 is about the project, not the model).
    assert client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"frobnicate": 1})
    assert unknown.value.body["param"] == "frobnicate" and "frobnicate" in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, presence_penalty=1.0)
    assert unsupported.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1_000_000)
    assert too_long.value.body["code"] == "context_length_exceeded"


TOOLS_BLOCK = ("{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}"
               "{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}")


def test_tools_reach_the_chat_template_as_transformers_renders_them(service, client, serving):
    """A base model whose template lists `tools` the way Qwen's do: the prompt the worker renders
    has exactly the tokens transformers' apply_chat_template(messages, tools=…) gives."""
    import shutil

    from transformers import AutoTokenizer

    tooled = service.models_root / "tiny-qwen3-tools"
    if not tooled.exists():
        shutil.copytree(service.models_root / MODEL, tooled)
        config_path = tooled / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = TOOLS_BLOCK + config["chat_template"]
        config_path.write_text(json.dumps(config))
    tools = [{"type": "function", "function": {"name": "lookup_cwe", "description": "Find a CWE by id",
                                               "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]
    plain = client.chat.completions.create(model="tiny-qwen3-tools", messages=MESSAGES, max_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(model="tiny-qwen3-tools", messages=MESSAGES, max_tokens=1, temperature=0, tools=tools)
    tok = AutoTokenizer.from_pretrained(tooled)
    expected = tok.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert with_tools.usage.prompt_tokens == len(expected)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20, "the tool's JSON is in the prompt"
    # tool_choice "none": the model is not told about the tools.
    none = client.chat.completions.create(model="tiny-qwen3-tools", messages=MESSAGES, max_tokens=1, tools=tools, tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_32_concurrent_requests_are_batched_and_answer_as_they_would_alone(service, client, serving):
    prompts = [[{"role": "user", "content": f"CVE-2024-{1000 + i % 4}: buffer overflow in parser {i % 4}."}] for i in range(32)]
    alone = {}
    for i in range(4):
        alone[i] = client.chat.completions.create(model=MODEL, messages=prompts[i], temperature=0, max_tokens=16)

    def ask(i):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=prompts[i], temperature=0, max_tokens=16)
        return i, int(raw.headers["x-lathe-batch-size"]), raw.parse()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    sizes = sorted(size for _, size, _ in results)
    print(f"\nbatch sizes seen by 32 concurrent requests: {sizes}")
    assert max(sizes) >= 8, f"requests were not batched together: {sizes}"
    for i, _, answer in results:
        assert answer.choices[0].message.content == alone[i % 4].choices[0].message.content, i
        assert answer.usage.completion_tokens == alone[i % 4].usage.completion_tokens
        assert answer.usage.prompt_tokens == alone[i % 4].usage.prompt_tokens


def test_a_kept_checkpoint_is_a_model_for_chat_and_evaluations_and_a_pruned_one_is_gone(service, client, api_key,
                                                                                         serving, training_file_id):
    """OpenAI's checkpoints: each listed `fine_tuned_model_checkpoint` answers chat (with the
    adapter of that step, as `lathe model generate` does with it) and evaluations; a job keeps its
    newest `keep_checkpoints` (3 by default), and the older ones are no model any more."""
    # Two epochs; a checkpoint every 2 steps and at the first epoch's end (the last step's model
    # is the fine-tuned model itself).
    job = create_job(client, training_file_id, n_epochs=2, seed=9, suffix="ckpt", extra={"checkpoint_every": 2})
    job = wait_for_status(client, job.id, "succeeded")
    total = len(metrics_curve(service, api_key, job.id))
    written = [s for s in range(1, total) if s % 2 == 0 or s == total // 2]
    listed = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in listed] == written[::-1][:3], ([c.step_number for c in listed], total)
    oldest = listed[-1].step_number
    model = listed[-1].fine_tuned_model_checkpoint
    assert model == f"{job.fine_tuned_model}:ckpt-step-{oldest}"

    checkpoint_dir = service.data_dir / "jobs" / job.id / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [f"step-{s:06d}" for s in written[-3:]]
    answer = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=12)
    _, generated, tok, _ = reference(service, MESSAGES, checkpoint_dir / f"step-{oldest:06d}" / "adapter", 12)
    assert answer.model == model
    assert answer.choices[0].message.content == tok.decode(generated, skip_special_tokens=True)

    evaluation = service.request("POST", "/v1/evaluations", key=api_key,
                                 json_body={"model": model, "benchmark": "cti-mcq", "limit": 2, "max_new_tokens": 4})
    assert evaluation.status == 200, evaluation.body[:500]
    assert evaluation.json()["model"] == model
    # A worker runs it with the checkpoint's adapter, linked from the job's directory.
    evaluation_id = evaluation.json()["id"]
    done = wait_until(lambda: (lambda e: e if e["status"] in {"succeeded", "failed", "cancelled"} else None)(
        service.request("GET", f"/v1/evaluations/{evaluation_id}", key=api_key).json()), 240, "the checkpoint's evaluation")
    assert done["status"] == "succeeded" and done["progress"]["items_done"] == 2, done

    for gone in (f"{job.fine_tuned_model}:ckpt-step-{written[0]}", f"{job.fine_tuned_model}:ckpt-step-{total + 1}"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model=gone, messages=MESSAGES, max_tokens=2)
        assert missing.value.body["code"] == "model_not_found", missing.value.body
        refused = service.request("POST", "/v1/evaluations", key=api_key,
                                  json_body={"model": gone, "benchmark": "cti-mcq", "limit": 2})
        assert refused.status == 400 and refused.json()["error"]["code"] == "model_not_found", refused.body[:300]
