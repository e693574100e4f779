"""GGUF export (issue 12): `lathe model export --format gguf` loaded by llama.cpp itself (the
`llama-cpp-python` package from PyPI, built from source on CPU by scripts/setup.sh).

For each architecture (Qwen3, Qwen2 with q/k/v biases, Llama with its rotary permutation) and a
trained LoRA adapter merged in: llama.cpp's logits on the same token ids against Lathe's, and
llama.cpp's greedy tokens against `lathe model generate`. f16 keeps the tokens equal; q8_0
(8-bit blocks of 32) is held to a stated logits tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import lathe_logits, run_lathe, sharpened_model, train

try:
    import llama_cpp
except ImportError:  # a failure, not a skip: the check must run wherever the tests do
    llama_cpp = None


@pytest.fixture(autouse=True)
def _llama_cpp_installed():
    if llama_cpp is None:
        pytest.fail("llama-cpp-python is not installed: run scripts/setup.sh (it builds llama.cpp once)", pytrace=False)

NEW_TOKENS = 16


def export(model_dir, out, weight_type, adapter=None):
    args = ["model", "export", "--model", model_dir, "--format", "gguf", "--type", weight_type, "--out", out]
    if adapter is not None:
        args += ["--adapter", adapter]
    run_lathe(*args)
    return out


def llama_logits_and_greedy(path, prompt):
    """llama.cpp's logits at every prompt position, and its greedy continuation."""
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, seed=0)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    generated = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    return torch.from_numpy(logits), generated


def lathe_greedy(model_dir, prompt, adapter=None):
    args = ["model", "generate", "--model", model_dir, "--max-new-tokens", NEW_TOKENS, "--input-ids", ",".join(map(str, prompt))]
    if adapter is not None:
        args += ["--adapter", adapter]
    return json.loads(run_lathe(*args).stdout)["tokens"][0]


def prompt_of(vocab: int, n: int = 20, seed: int = 5):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_llama_cpp_loads_the_export_and_computes_lathes_logits(tiny_model, tmp_path, arch):
    # Sharpened, so that greedy tokens are decided by clear margins rather than by noise.
    model_dir = sharpened_model(tiny_model(arch), tmp_path / "model", target_logit_std=2.0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = prompt_of(vocab)
    reference = lathe_logits(tmp_path / "ref", model_dir, torch.tensor([prompt]))[0]
    scale = reference.abs().max().item()

    logits, greedy = llama_logits_and_greedy(export(model_dir, tmp_path / "f16.gguf", "f16"), prompt)
    f16_error = (logits - reference).abs().max().item()
    print(f"\n{arch} f16: max |llama.cpp - lathe| = {f16_error:.2e} (logits up to {scale:.1f})")
    assert f16_error < 1e-2 * scale
    assert greedy == lathe_greedy(model_dir, prompt)

    logits, greedy = llama_logits_and_greedy(export(model_dir, tmp_path / "bf16.gguf", "bf16"), prompt)
    bf16_error = (logits - reference).abs().max().item()
    print(f"{arch} bf16: max |llama.cpp - lathe| = {bf16_error:.2e}")
    assert bf16_error < 3e-2 * scale

    logits, _ = llama_logits_and_greedy(export(model_dir, tmp_path / "q8.gguf", "q8_0"), prompt)
    q8_error = (logits - reference).abs().max().item()
    print(f"{arch} q8_0: max |llama.cpp - lathe| = {q8_error:.2e}")
    assert q8_error < 5e-2 * scale
    # The argmax at each prompt position agrees where Lathe's margin is clear.
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * q8_error
    assert (logits.argmax(-1)[clear] == reference.argmax(-1)[clear]).all()


def test_a_fine_tuned_adapter_is_merged_into_the_export(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3")
    adapter = train(tmp_path, model_dir, optim={"learning_rate": 2e-2}, train={"max_steps": 30}) / "adapter"
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = prompt_of(vocab, seed=11)
    tuned = lathe_logits(tmp_path / "tuned", model_dir, torch.tensor([prompt]), adapter=adapter)[0]
    base = lathe_logits(tmp_path / "base", model_dir, torch.tensor([prompt]))[0]
    logits, greedy = llama_logits_and_greedy(export(model_dir, tmp_path / "ft.gguf", "f16", adapter=adapter), prompt)
    error = (logits - tuned).abs().max().item()
    assert error < 1e-2 * tuned.abs().max().item()
    assert (logits - base).abs().max().item() > 10 * error, "the export is the base model: the adapter is missing"
    assert greedy == lathe_greedy(model_dir, prompt, adapter=adapter)
