"""Generation and evaluation throughput (run by scripts/bench_eval.sh).

For each preset (tiny, small): greedy generation of `--new-tokens` tokens for a batch of random
prompts with Lathe (`lathe model generate`, KV cache) and with transformers `generate` on the
same weights, in this one run; tokens/s side by side and whether the tokens agree. Then Lathe's
evaluation throughput (items/s) on CTI-MCQ (generate and likelihood modes) and CTI-RCM.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import torch


def lathe(bin_path: str, *args) -> str:
    return subprocess.run([bin_path, *map(str, args)], capture_output=True, text=True, check=True).stdout


def bench_generate(bin_path: str, model_dir: Path, batch: int, prompt_len: int, new_tokens: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=gen)
    with torch.no_grad():
        model.generate(prompts[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        started = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hf_seconds = time.perf_counter() - started
    hf_tokens = out[:, prompt_len:].tolist()

    args = ["model", "generate", "--model", model_dir, "--max-new-tokens", new_tokens, "--warmup"]
    for row in prompts.tolist():
        args += ["--input-ids", ",".join(map(str, row))]
    result = json.loads(lathe(bin_path, *args))
    return {
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens_per_row": new_tokens,
        "lathe_tokens_per_s": result["new_tokens"] / result["seconds"],
        "hf_tokens_per_s": batch * new_tokens / hf_seconds,
        "same_tokens": result["tokens"] == hf_tokens,
    }


def bench_eval(bin_path: str, model_dir: Path, data_dir: Path, limit: int) -> dict:
    rates = {}
    for benchmark, mode in [("cti-mcq", "generate"), ("cti-mcq", "likelihood"), ("cti-rcm", "generate")]:
        out = lathe(bin_path, "eval", "run", "--model", model_dir, "--data-dir", data_dir, "--benchmarks", benchmark,
                    "--limit", limit, "--mode", mode, "--device", "cpu", "--dtype", "fp32")
        rates[f"{benchmark}/{mode}"] = float(re.search(r"([0-9.]+) items/s", out).group(1))
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lathe", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    report = {}
    for preset in args.presets.split(","):
        model_dir = args.work / f"{preset}-qwen3"
        if not (model_dir / "config.json").exists():
            lathe(args.lathe, "model", "init", "--arch", "qwen3", "--preset", preset, "--out", model_dir)
        gen = bench_generate(args.lathe, model_dir, args.batch, args.prompt_tokens, args.new_tokens, args.threads)
        ev = bench_eval(args.lathe, model_dir, args.data_dir, args.eval_limit)
        report[preset] = {"generate": gen, "eval_items_per_s": ev}
        print(f"{preset}: generate {gen['lathe_tokens_per_s']:.1f} tok/s vs transformers {gen['hf_tokens_per_s']:.1f} tok/s "
              f"-> {gen['lathe_tokens_per_s'] / gen['hf_tokens_per_s']:.2f}x (batch {args.batch}, same tokens: {gen['same_tokens']}); "
              + ", ".join(f"{k} {v:.2f} items/s" for k, v in ev.items()))
    (args.work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
