"""QLoRA: Lathe's NF4 base weights are bitsandbytes' bit for bit, and a QLoRA run takes the steps
transformers + PEFT take on a `BitsAndBytesConfig(load_in_4bit=True)` model.

bitsandbytes runs NF4 on CPU (its `quantize_4bit` default kernel and its C dequantizer), so all of
this runs here; the comparisons are in fp32 compute, where both sides multiply by the same
dequantized weights and only summation order can differ.
"""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import (IGNORE_INDEX, assert_losses_match, init_model, lathe_logits, load_batches, load_hf_model,
                      random_input_ids, reference_training, run_lathe, sharpened_model, step_events, train,
                      token_cross_entropy_sum)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

STEPS = 20
OPTIM = {"learning_rate": 5e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "max_grad_norm": 1.0, "lr_scheduler": "cosine", "warmup_steps": 3}
# Same dequantized weights on both sides; what is left is fp32 summation order in matmuls.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_4bit_model(model_dir, double_quant=True):
    """The model as transformers loads it for QLoRA: projections in bitsandbytes NF4, fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32,
                                                     device_map="cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.num_hidden_layers, f"bitsandbytes quantized {len(quantized)} layers"
    for module in quantized:
        # On CPUs with AVX512-BF16, bitsandbytes' eval-mode forward repacks the weights for a bf16
        # kernel, whatever bnb_4bit_compute_dtype says; keep the fp32 path training uses.
        module.support_avx512bf16_for_cpu = False
    return model


def dequantize_like_bitsandbytes(packed, state):
    """`bitsandbytes.functional.dequantize_4bit`, except where its CPU kernel is wrong: the AVX-512
    path (bitsandbytes 0.50, csrc/cpu_ops.cpp) looks scales up per row, `row * (in // 64) + col // 64`,
    which is only the flat block index when a row is a whole number of blocks. Real models' rows
    are (1024, 2816, 4096, ...); the tiny preset's down_proj rows are 176 long. For those, the
    reference is bitsandbytes' own portable kernel, which indexes flat blocks as quantize_4bit wrote them."""
    if state.shape[-1] % state.blocksize == 0:
        return F.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    # __wrapped__: the plain function under bitsandbytes' torch.compile wrapper.
    portable = _dequantize_4bit_compute.__wrapped__
    return portable(packed.reshape(-1), absmax.float(), state.code, state.blocksize, state.shape, state.dtype)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, lathe_bin):
    """The small preset: real projection shapes (1024 x 1024 ... 2816 x 1024), stored in bf16."""
    return init_model(tmp_path_factory.mktemp("small") / "model", "qwen3", "small", seed=0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
def test_nf4_quantize_and_dequantize_equal_bitsandbytes_bit_for_bit(preset, double_quant, tiny_model, small_model,
                                                                      tmp_path):
    model_dir = tiny_model("qwen3") if preset == "tiny" else small_model
    out, dequantized_out = tmp_path / "nf4.safetensors", tmp_path / "dequantized.safetensors"
    args = ["model", "quantize", "--model", model_dir, "--out", out, "--dequantized-out", dequantized_out]
    printed = run_lathe(*args, *([] if double_quant else ["--no-double-quant"])).stdout
    print(printed.strip())
    lathe, lathe_back = load_file(str(out)), load_file(str(dequantized_out))
    original = load_file(str(model_dir / "model.safetensors"))
    names = sorted(n for n in original if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS)
    assert sorted(lathe_back) == names, "lathe quantized a different set of weights than bitsandbytes would"
    for name in names:
        weight = original[name]
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(lathe[name], packed), f"{name}: 4-bit codes differ from bitsandbytes'"
        assert torch.equal(lathe[f"{name}.quant_map"], state.code), f"{name}: NF4 table differs"
        assert torch.equal(lathe[f"{name}.absmax"], state.absmax), f"{name}: block scales differ"
        if double_quant:
            assert torch.equal(lathe[f"{name}.nested_absmax"], state.state2.absmax), f"{name}: nested absmax differs"
            assert torch.equal(lathe[f"{name}.nested_quant_map"], state.state2.code), f"{name}: dynamic code differs"
            assert lathe[f"{name}.nested_offset"].item() == state.offset.item(), f"{name}: offset differs"
        else:
            assert f"{name}.nested_absmax" not in lathe
        back = dequantize_like_bitsandbytes(packed, state)
        assert back.dtype == weight.dtype
        assert torch.equal(lathe_back[name], back), (
            f"{name}: dequantized weights differ from bitsandbytes' "
            f"(max {(lathe_back[name].float() - back.float()).abs().max().item():.3e})")


def whole_block_rows(src, dst, intermediate=192):
    """A copy of the tiny model with its MLP widened from 176 to 192, so every weight row is a whole
    number of 64-blocks and bitsandbytes' AVX-512 kernel dequantizes it right (see above)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    old = config["intermediate_size"]
    config["intermediate_size"] = intermediate
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for name, w in list(weights.items()):
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            extra = torch.randn(intermediate - old, w.shape[1], generator=gen) * w.std()
            weights[name] = torch.cat([w, extra.to(w.dtype)], 0)
        elif name.endswith("down_proj.weight"):
            extra = torch.randn(w.shape[0], intermediate - old, generator=gen) * w.std()
            weights[name] = torch.cat([w, extra.to(w.dtype)], 1)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qlora-parity")
    model_dir = sharpened_model(whole_block_rows(tiny_model("qwen3"), tmp_path / "aligned"), tmp_path / "model")
    run = train(tmp_path, model_dir, quantization="nf4", double_quantization=True, optim=OPTIM,
                train={"epochs": 5, "max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 2,
                       "dtype": "fp32"},
                lora={"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"})
    return model_dir, run


@pytest.mark.slow
def test_qlora_losses_match_peft_on_a_bitsandbytes_4bit_model_step_by_step(qlora_run):
    from peft import PeftModel

    model_dir, run = qlora_run
    steps = step_events(run)
    assert len(steps) == STEPS, f"{len(steps)} step events, expected {STEPS}"
    model = PeftModel.from_pretrained(bnb_4bit_model(model_dir), run / "debug" / "initial_adapter", is_trainable=True)
    reference = reference_training(model, steps, load_batches(run), OPTIM)
    assert_losses_match(steps, reference, LOSS_RTOL, GRAD_NORM_RTOL)


@pytest.mark.slow
def test_the_qlora_adapter_loads_in_peft_on_the_4bit_and_the_unquantized_base_and_lowers_the_loss(qlora_run, tmp_path):
    from peft import PeftModel

    model_dir, run = qlora_run
    adapter = run / "adapter"
    batches = [m for micros in load_batches(run).values() for m in micros]

    def mean_loss(model):
        model.eval()
        with torch.no_grad():
            total, tokens = 0.0, 0
            for m in batches:
                logits = model(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).logits
                total += token_cross_entropy_sum(logits, m["targets"]).item()
                tokens += int((m["targets"] != IGNORE_INDEX).sum())
        return total / tokens

    base_4bit = mean_loss(bnb_4bit_model(model_dir))
    tuned_4bit = mean_loss(PeftModel.from_pretrained(bnb_4bit_model(model_dir), adapter))
    base = mean_loss(load_hf_model(model_dir))
    tuned = mean_loss(PeftModel.from_pretrained(load_hf_model(model_dir), adapter))
    print(f"training rows: 4-bit base {base_4bit:.4f} -> with adapter {tuned_4bit:.4f}; "
          f"unquantized base {base:.4f} -> with adapter {tuned:.4f}")
    assert tuned_4bit < 0.8 * base_4bit, "the QLoRA adapter did not lower the loss on its 4-bit base"
    assert tuned < 0.8 * base, "the QLoRA adapter did not carry over to the unquantized base"

    # Lathe's own forward on the 4-bit base with the adapter gives PEFT's logits.
    vocab = load_hf_model(model_dir).config.vocab_size
    ids = random_input_ids(vocab)
    ours = lathe_logits(tmp_path, model_dir, ids, adapter=adapter)  # unquantized base
    peft_model = PeftModel.from_pretrained(load_hf_model(model_dir), adapter).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    assert (ours - expected).abs().max().item() < 1e-4
    out = tmp_path / "nf4-logits.safetensors"
    from safetensors.torch import save_file
    save_file({"input_ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    run_lathe("model", "forward", "--model", model_dir, "--adapter", adapter, "--input", tmp_path / "ids.safetensors",
              "--out", out, "--quantization", "nf4")
    peft_4bit = PeftModel.from_pretrained(bnb_4bit_model(model_dir), adapter).eval()
    with torch.no_grad():
        expected_4bit = peft_4bit(input_ids=ids).logits
    diff = (load_file(str(out))["logits"] - expected_4bit).abs().max().item()
    print(f"logits on the 4-bit base with the adapter: max |lathe - bitsandbytes + peft| = {diff:.2e}")
    assert diff < 1e-4, f"QLoRA logits differ from bitsandbytes + PEFT by {diff:.2e}"
