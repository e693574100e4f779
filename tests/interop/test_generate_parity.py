"""Greedy generation with Lathe's KV cache vs transformers `generate` on the same weights, token
for token: base models of each architecture, a base + LoRA adapter, and a ragged batch (left
padding) that must give every prompt the tokens it gets alone."""

import json

import pytest
import torch

from conftest import load_hf_model, load_peft_model, run_lathe, train

MAX_NEW = 24


def lathe_generate(model_dir, prompts, adapter=None, stop_ids=()):
    args = ["model", "generate", "--model", model_dir, "--max-new-tokens", MAX_NEW]
    if adapter is not None:
        args += ["--adapter", adapter]
    for prompt in prompts:
        args += ["--input-ids", ",".join(map(str, prompt))]
    if stop_ids:
        args += ["--stop-ids", ",".join(map(str, stop_ids))]
    return json.loads(run_lathe(*args).stdout)["tokens"]


def hf_generate(model, prompt, stop_ids=()):
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=list(stop_ids) or None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(vocab: int, lengths=(7, 19, 3), seed: int = 99):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_greedy_generation_matches_transformers_token_for_token(tiny_model, arch):
    model_dir = tiny_model(arch)
    model = load_hf_model(model_dir)
    batch = prompts(model.config.vocab_size)
    expected = [hf_generate(model, p) for p in batch]
    assert all(len(e) == MAX_NEW for e in expected)
    # One call with the ragged batch (left padding inside Lathe) and one per prompt.
    assert lathe_generate(model_dir, batch) == expected
    assert [lathe_generate(model_dir, [p])[0] for p in batch[:1]] == expected[:1]


def test_generation_with_an_adapter_and_stop_tokens_matches_peft(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3")
    adapter = train(tmp_path, model_dir, optim={"learning_rate": 2e-2}, train={"max_steps": 30}) / "adapter"
    tuned = load_peft_model(model_dir, adapter)
    base = load_hf_model(model_dir)
    batch = prompts(tuned.config.vocab_size, lengths=(11, 5), seed=7)
    expected = [hf_generate(tuned, p) for p in batch]
    assert expected != [hf_generate(base, p) for p in batch], "the adapter does not change the generation"
    assert lathe_generate(model_dir, batch, adapter=adapter) == expected

    # Stop at a token the tuned model actually produces: the sequence ends with it.
    stop = expected[0][5]
    want = [hf_generate(tuned, p, stop_ids=[stop]) for p in batch]
    got = lathe_generate(model_dir, batch, adapter=adapter, stop_ids=[stop])
    assert got == want
    assert got[0][-1] == stop and len(got[0]) <= 6
