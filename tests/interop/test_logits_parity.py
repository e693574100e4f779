"""Lathe's forward pass gives the logits `transformers` gives, for each supported architecture.

Each model is made by `lathe model init`, then its 1-D tensors (RMSNorm weights, attention
biases) are perturbed away from their init values (ones / zeros), so a missing bias, a norm
applied to the wrong tensor or an off-by-one in `1 + w` cannot hide behind the initialisation.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import (assert_logits_close, copy_model_dir, hf_logits, lathe_logits, load_hf_model,
                      random_input_ids)

ATOL_FP32 = 1e-4

# What each architecture must exercise in Lathe's one decoder implementation.
ARCH_FEATURES = {
    "qwen3": {"model_type": "qwen3", "qk_norm": True, "qkv_bias": False},
    "qwen2": {"model_type": "qwen2", "qk_norm": False, "qkv_bias": True},
    "llama": {"model_type": "llama", "qk_norm": False, "qkv_bias": False},
}


def perturb_vectors(model_dir, seed: int = 7):
    """Adds noise to every 1-D tensor of model.safetensors (norm weights, biases), in place."""
    path = model_dir / "model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    tensors, perturbed = {}, []
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            t = f.get_tensor(key)
            if t.dim() == 1:
                t = (t.float() + 0.1 * torch.randn(t.shape, generator=gen)).to(t.dtype)
                perturbed.append(key)
            tensors[key] = t.contiguous()
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return perturbed


@pytest.fixture(scope="module")
def perturbed_models(tiny_model, tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = copy_model_dir(tiny_model(arch), tmp_path_factory.mktemp(f"perturbed-{arch}") / "model")
            perturbed = perturb_vectors(made[arch])
            assert any("norm" in k for k in perturbed), f"{arch}: no norm weights in model.safetensors"
        return made[arch]

    return get


def assert_arch_features(model, arch: str):
    expected = ARCH_FEATURES[arch]
    config = model.config
    assert config.model_type == expected["model_type"], f"{arch}: config.json model_type {config.model_type}"
    attn = model.model.layers[0].self_attn
    has_qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert has_qk_norm == expected["qk_norm"], f"{arch}: q/k norm present = {has_qk_norm}"
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert (proj.bias is not None) == expected["qkv_bias"], f"{arch}: q/k/v bias present = {proj.bias is not None}"
    assert attn.o_proj.bias is None, f"{arch}: o_proj must have no bias"
    # grouped-query attention: the tiny presets must exercise the repeat of k/v heads
    assert config.num_key_value_heads < config.num_attention_heads, (
        f"{arch}: tiny preset has {config.num_key_value_heads} kv heads for {config.num_attention_heads} "
        "query heads; GQA would go untested")
    if arch == "llama":
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        assert rope.get("rope_type") == "llama3", f"llama: tiny preset should use Llama 3 rope scaling, got {rope}"
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == bool(config.tie_word_embeddings), f"{arch}: tie_word_embeddings={config.tie_word_embeddings} but tied={tied}"
    return tied


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_lathe_logits_match_transformers_in_fp32(arch, perturbed_models, tmp_path):
    model_dir = perturbed_models(arch)
    model = load_hf_model(model_dir, torch.float32)
    assert_arch_features(model, arch)
    input_ids = random_input_ids(model.config.vocab_size, batch=2, seq=24, seed=1234)

    expected = hf_logits(model, input_ids)
    actual = lathe_logits(tmp_path, model_dir, input_ids)

    assert_logits_close(actual, expected, ATOL_FP32, f"{arch} fp32 logits")


def test_tiny_presets_cover_tied_and_untied_embeddings(tiny_model):
    """Across the three presets both the tied and the untied lm_head path must be exercised."""
    tied = {}
    for arch in ARCH_FEATURES:
        model = load_hf_model(tiny_model(arch), torch.float32)
        tied[arch] = assert_arch_features(model, arch)
    assert set(tied.values()) == {True, False}, f"tie_word_embeddings per arch: {tied}"


def test_tiny_model_weights_are_float32_and_the_tokenizer_covers_the_vocab(tiny_model):
    from transformers import AutoTokenizer

    model_dir = tiny_model("qwen3")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}, f"tiny preset must be float32, found {dtypes}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf_model(model_dir)
    assert len(tokenizer) <= model.config.vocab_size, "tokenizer ids exceed the embedding table"
    assert tokenizer.chat_template, "tokenizer_config.json carries no chat template"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert "hi" in rendered


def test_lathe_bf16_forward_is_as_close_to_fp32_as_transformers_bf16(perturbed_models, tmp_path):
    """bf16 logits cannot match bit for bit; Lathe's bf16 error against the fp32 reference must be
    of the same order as transformers' own bf16 error."""
    model_dir = perturbed_models("qwen3")
    reference = load_hf_model(model_dir, torch.float32)
    input_ids = random_input_ids(reference.config.vocab_size, batch=2, seq=24, seed=99)
    exact = hf_logits(reference, input_ids)
    hf_bf16_err = (hf_logits(load_hf_model(model_dir, torch.bfloat16), input_ids) - exact).abs().max().item()

    lathe_bf16 = lathe_logits(tmp_path, model_dir, input_ids, dtype="bf16")
    lathe_err = (lathe_bf16 - exact).abs().max().item()

    bound = 4 * hf_bf16_err + 1e-2 * exact.abs().max().item()
    assert lathe_err <= bound, (f"lathe bf16 max error {lathe_err:.3e} vs transformers bf16 {hf_bf16_err:.3e} "
                                f"(bound {bound:.3e})")
    assert lathe_err > 0, "bf16 logits equal fp32 logits exactly: was --dtype bf16 ignored?"
