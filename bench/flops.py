"""FLOPs of one LoRA training token, from a model's config.json alone.

Both sides of the benchmark (Lathe and the transformers + PEFT baseline) are scored with this one
count, so MFU compares the same work.

Per token of a sequence of length T, for a decoder with L layers:

    flops_per_token = 4 * N_frozen + 6 * N_lora + 12 * L * T * d_attn

- N_frozen: weights of every matmul of the frozen base (q, k, v, o, gate, up, down in each layer,
  plus lm_head; the embedding lookup is not a matmul). Forward costs 2 FLOPs per weight (one
  multiply-add); backward needs only the gradient w.r.t. the activations, another 2 per weight
  (no weight gradient for frozen weights): 4 * N_frozen.
- N_lora: LoRA A and B weights (r * (in + out) per adapted module). Forward 2, backward 4
  (activation and weight gradients): 6 * N_lora.
- Attention scores and the weighted sum: QK^T and AV cost 2 * T * d_attn each per token and layer
  in the forward (the full T x T matrix, as the kernels compute it; causal masking is not
  subtracted, as in the PaLM MFU convention); backward is twice the forward:
  (4 + 8) * L * T * d_attn, with d_attn = num_attention_heads * head_dim.
Norms, activations, softmax, rotary and the optimizer are not counted (they are not matmuls).
"""

from __future__ import annotations

import json
from pathlib import Path

LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each per-layer projection."""
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv_heads * head_dim),
        "v_proj": (d, kv_heads * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }


def count(config: dict, seq_len: int, lora_rank: int, lora_targets=LORA_ALL_LINEAR) -> dict:
    layers = config["num_hidden_layers"]
    shapes = linear_shapes(config)
    n_frozen = layers * sum(i * o for i, o in shapes.values()) + config["hidden_size"] * config["vocab_size"]
    n_lora = layers * sum(lora_rank * (shapes[name][0] + shapes[name][1]) for name in lora_targets)
    heads = config["num_attention_heads"]
    d_attn = heads * (config.get("head_dim") or config["hidden_size"] // heads)
    attention = 12 * layers * seq_len * d_attn
    return {
        "n_frozen_matmul_params": n_frozen,
        "n_lora_params": n_lora,
        "flops_per_token": 4 * n_frozen + 6 * n_lora + attention,
        "formula": "4*N_frozen + 6*N_lora + 12*L*T*d_attn",
    }


def count_for_model(model_dir: str | Path, seq_len: int, lora_rank: int) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return count(config, seq_len, lora_rank)
