"""A LoRA adapter trained by Lathe loads in PEFT and gives the same logits; so does the merged model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import (LORA_PROJECTIONS, assert_logits_close, hf_logits, lathe_logits, load_hf_model,
                      load_peft_model, random_input_ids, run_lathe, train)

ATOL = 1e-4


def assert_adapter_files_match_peft(model_dir, adapter_dir, targets: set[str], rank: int, alpha: float,
                                    use_rslora: bool):
    """adapter_config.json holds what PEFT needs, and the tensors are exactly the ones PEFT expects."""
    from peft import get_peft_model_state_dict

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == rank
    assert float(config["lora_alpha"]) == alpha
    assert bool(config.get("use_rslora", False)) == use_rslora
    assert config.get("base_model_name_or_path"), "adapter_config.json lacks base_model_name_or_path"
    # PEFT accepts short names ("q_proj"), full module paths (what PEFT itself writes after expanding
    # "all-linear") or the string "all-linear"; each must name exactly the adapted projections.
    listed = config["target_modules"]
    if listed == "all-linear":
        assert targets == LORA_PROJECTIONS, f"target_modules all-linear, expected {targets}"
    else:
        listed = [listed] if isinstance(listed, str) else listed
        assert {name.split(".")[-1] for name in listed} == targets, f"target_modules {listed}, expected {targets}"

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    peft_model = load_peft_model(model_dir, adapter_dir)
    expected_keys = set(get_peft_model_state_dict(peft_model).keys())
    assert set(tensors) == expected_keys, (
        f"adapter tensors differ from what PEFT expects:\n only in file: {sorted(set(tensors) - expected_keys)[:6]}"
        f"\n only in PEFT: {sorted(expected_keys - set(tensors))[:6]}")
    adapted = {key.split(".")[-3] for key in tensors}
    assert adapted == targets, f"adapted modules {adapted}, expected {targets}"
    for key, tensor in tensors.items():
        assert key.startswith("base_model.model.model.layers."), f"unexpected key {key}"
        assert tensor.dtype == torch.float32, f"{key}: {tensor.dtype}"
        if ".lora_A." in key:
            assert tensor.shape[0] == rank, f"{key}: shape {tuple(tensor.shape)}"
        if ".lora_B." in key:
            assert tensor.shape[1] == rank, f"{key}: shape {tuple(tensor.shape)}"
            # an untrained adapter (B = 0) would make every comparison below trivially true
            assert tensor.abs().max().item() > 0, f"{key} is all zeros after training"
    return peft_model


@pytest.mark.slow
def test_trained_adapter_and_merged_model_give_lathe_logits_in_transformers(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3")
    run = train(tmp_path, model_dir, optim={"learning_rate": 5e-3}, train={"max_steps": 4})
    adapter_dir = run / "adapter"

    peft_model = assert_adapter_files_match_peft(model_dir, adapter_dir, LORA_PROJECTIONS, rank=8, alpha=16.0,
                                                 use_rslora=False)
    input_ids = random_input_ids(peft_model.config.vocab_size, batch=2, seq=24, seed=4321)
    expected = hf_logits(peft_model, input_ids)
    base_logits = hf_logits(load_hf_model(model_dir), input_ids)
    assert (expected - base_logits).abs().max().item() > 10 * ATOL, "the adapter barely changes the logits"

    # (a) the adapter applied by Lathe == the adapter applied by PEFT
    actual = lathe_logits(tmp_path / "fwd-adapter", model_dir, input_ids, adapter=adapter_dir)
    assert_logits_close(actual, expected, ATOL, "base + adapter (lathe) vs PeftModel")

    # (b) the model merged by Lathe, loaded by plain transformers == PEFT's base + adapter
    merged_dir = tmp_path / "merged"
    run_lathe("model", "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", merged_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged_dir / name).is_file(), f"merged model lacks {name}"
    merged_tensors = {}
    for path in merged_dir.glob("*.safetensors"):
        merged_tensors.update(load_file(str(path)))
    assert not [k for k in merged_tensors if "lora" in k], "merged model still holds LoRA tensors"
    merged = load_hf_model(merged_dir, torch.float32)
    assert_logits_close(hf_logits(merged, input_ids), expected, ATOL, "merged model (transformers) vs PeftModel")

    # and Lathe reads its own merged model back
    actual_merged = lathe_logits(tmp_path / "fwd-merged", merged_dir, input_ids)
    assert_logits_close(actual_merged, expected, ATOL, "merged model (lathe) vs PeftModel")


@pytest.mark.slow
def test_rslora_adapter_on_listed_modules_loads_in_peft(tiny_model, tmp_path):
    """rsLoRA scales by alpha/sqrt(r), not alpha/r: a wrong flag or scale shows up in the logits."""
    model_dir = tiny_model("qwen3")
    targets = {"q_proj", "v_proj"}
    run = train(tmp_path, model_dir, optim={"learning_rate": 5e-3}, train={"max_steps": 3},
                lora={"rank": 4, "alpha": 8.0, "target_modules": sorted(targets), "use_rslora": True})
    adapter_dir = run / "adapter"

    peft_model = assert_adapter_files_match_peft(model_dir, adapter_dir, targets, rank=4, alpha=8.0,
                                                 use_rslora=True)
    input_ids = random_input_ids(peft_model.config.vocab_size, batch=2, seq=24, seed=77)
    actual = lathe_logits(tmp_path / "fwd", model_dir, input_ids, adapter=adapter_dir)
    assert_logits_close(actual, hf_logits(peft_model, input_ids), ATOL, "rsLoRA adapter (lathe) vs PeftModel")


@pytest.mark.slow
def test_merge_in_output_section_writes_a_model_transformers_loads(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    run = train(tmp_path, model_dir, optim={"learning_rate": 5e-3}, train={"max_steps": 2},
                output={"merge": True})
    peft_model = load_peft_model(model_dir, run / "adapter")
    merged = load_hf_model(run / "merged")
    input_ids = random_input_ids(merged.config.vocab_size, batch=1, seq=16, seed=5)
    assert_logits_close(hf_logits(merged, input_ids), hf_logits(peft_model, input_ids), ATOL,
                        "output/merged vs PeftModel")
