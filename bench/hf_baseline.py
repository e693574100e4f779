"""The transformers + PEFT baseline of Lathe's LoRA benchmark (docs/architecture.md §6).

Trains LoRA (rank 16, alpha 32, dropout 0, on q, k, v, o, gate, up, down) on a model directory
with a plain torch loop: forward with the attention mask, summed token cross-entropy / trained
tokens, backward, clip to 1.0, AdamW. The tokens are Lathe's own: `--batches` reads the
`debug/batches.safetensors` a `lathe train` run dumped (same rows, masks and targets, step by
step), so both sides do exactly the same work. `--tokens` instead reads `input_ids` (B x T) and
trains on every next token. `--initial-adapter` starts from Lathe's initial LoRA weights and
`--events` replays Lathe's learning rate per step, so the loss curves can be compared too.

Prints one JSON object: tokens_per_second (real input tokens, i.e. attention_mask sum, per second
of measured steps; warm-up steps excluded), peak_rss_mb (VmHWM), losses, achieved FLOP/s (the
count in bench/flops.py) and, given --peak-flops, MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402

IGNORE_INDEX = -100


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_steps(args) -> list[list[dict[str, torch.Tensor]]]:
    """A list of steps, each a list of micro-batches {input_ids, targets, attention_mask}."""
    if args.batches:
        tensors = load_file(args.batches)
        steps: dict[int, dict[int, dict]] = {}
        for key, tensor in tensors.items():
            step, micro, field = key.split(".")
            steps.setdefault(int(step[4:]), {}).setdefault(int(micro[5:]), {})[field] = tensor
        return [[steps[s][m] for m in sorted(steps[s])] for s in sorted(steps)]
    ids = load_file(args.tokens)["input_ids"].to(torch.int64)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    mask = torch.ones_like(ids)
    rows = range(0, ids.shape[0] - args.batch_size + 1, args.batch_size)
    return [[{"input_ids": ids[r:r + args.batch_size], "targets": targets[r:r + args.batch_size],
              "attention_mask": mask[r:r + args.batch_size]}] for r in rows]


def build_model(args, dtype: torch.dtype):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    base.config.use_cache = False
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    if args.initial_adapter:
        return PeftModel.from_pretrained(base, args.initial_adapter, is_trainable=True)
    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=list(flops.LORA_ALL_LINEAR))
    return get_peft_model(base, config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--batches", help="Lathe's debug/batches.safetensors")
    source.add_argument("--tokens", help="safetensors with input_ids (B x T)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step with --tokens")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps run first and not timed")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-4, help="constant lr unless --events is given")
    parser.add_argument("--events", help="Lathe's events.jsonl: use its lr for each step")
    parser.add_argument("--initial-adapter", help="start from this PEFT adapter (Lathe's debug/initial_adapter)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-flops", type=float, help="matmul peak (bench/matmul_peak.py) for MFU")
    parser.add_argument("--threads", type=int, help="default: torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="write a torch.profiler Chrome trace of the last warm-up step here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    steps = load_steps(args)
    total = args.warmup_steps + args.steps
    assert steps, "no batches"
    lrs = [args.lr] * total
    if args.events:
        events = [json.loads(line) for line in open(args.events) if line.strip()]
        lrs = [e["lr"] for e in events if e.get("type") == "step"][:total]
        lrs += [lrs[-1]] * (total - len(lrs))

    model = build_model(args, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()

    losses, step_seconds, step_tokens = [], [], []
    for index in range(total):
        micros = steps[index % len(steps)]  # cycle when fewer batches than steps
        for group in optimizer.param_groups:
            group["lr"] = lrs[index]
        trained = sum(int((m["targets"] != IGNORE_INDEX).sum()) for m in micros)
        profiler = None
        if args.profile and index == args.warmup_steps - 1:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            profiler.__enter__()
        start = time.perf_counter()
        loss_sum = 0.0
        for micro in micros:
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), micro["targets"].flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
            (ce / trained).backward()
            loss_sum += ce.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(args.profile)
        step_tokens.append(sum(int(m["attention_mask"].sum()) for m in micros))
        losses.append(loss_sum / trained)
        print(f"step {index + 1}/{total} loss {losses[-1]:.6f} {step_seconds[-1]:.2f}s", file=sys.stderr)

    measured_seconds = sum(step_seconds[args.warmup_steps:])
    measured_tokens = sum(step_tokens[args.warmup_steps:])
    tokens_per_second = measured_tokens / measured_seconds
    seq_len = steps[0][0]["input_ids"].shape[1]
    count = flops.count_for_model(args.model, seq_len, args.rank)
    achieved = tokens_per_second * count["flops_per_token"]
    result = {
        "impl": "transformers+peft",
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": torch.get_num_threads(),
        "seq_len": seq_len,
        "tokens_per_step": step_tokens[args.warmup_steps:],
        "tokens_per_second": tokens_per_second,
        "seconds_per_step": measured_seconds / args.steps,
        "peak_rss_mb": peak_rss_mb(),
        "losses": losses,
        "flops_per_token": count["flops_per_token"],
        "flops_formula": count["formula"],
        "achieved_flops_per_second": achieved,
        "mfu": achieved / args.peak_flops if args.peak_flops else None,
        "trainable_params": sum(p.numel() for p in params),
    }
    assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
