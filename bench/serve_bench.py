"""Inference throughput (run by scripts/bench_serve.sh): chat completions through the `openai` SDK
against one inference worker, and transformers `generate` on the same weights and prompts.

For each concurrency C: C different chat prompts sent at once, streamed; time to first token (the
first chunk) and tokens/s per request, the requests' aggregate tokens/s, and the mean batch size
the worker generated in (from its Prometheus histogram). Then the same C requests one at a time
(what batching buys), and transformers `generate` on the same prompt ids as one left-padded batch
(time to first token = prefill + one token; tokens/s per sequence). All in this one run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import openai
import torch


def prompts(n: int) -> list[list[dict]]:
    rows = Path("examples/cve-cwe/train.jsonl").read_text().splitlines()
    out = []
    for i in range(n):
        messages = json.loads(rows[i % len(rows)])["messages"]
        user = next(m for m in messages if m["role"] == "user")
        out.append([{"role": "system", "content": "Map the CVE to its CWE."}, {"role": "user", "content": user["content"]}])
    return out


def batch_histogram(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = sum(float(v) for v in re.findall(r"lathe_worker_inference_batch_size_sum\{[^}]*\} (\S+)", text))
    count = sum(float(v) for v in re.findall(r"lathe_worker_inference_batch_size_count\{[^}]*\} (\S+)", text))
    return total, count


def one_request(client, model, messages, new_tokens) -> dict:
    started = time.perf_counter()
    first = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=new_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    ended = time.perf_counter()
    tokens = usage.completion_tokens
    return {"ttft": first - started, "seconds": ended - started, "tokens": tokens,
            "tokens_per_second": tokens / max(ended - first, 1e-9) if tokens > 1 else 0.0}


def lathe_concurrent(client, model, batch, new_tokens, metrics_url) -> dict:
    results: list[dict] = [None] * len(batch)  # type: ignore[list-item]
    before = batch_histogram(metrics_url)

    def run(i):
        results[i] = one_request(client, model, batch[i], new_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = batch_histogram(metrics_url)
    steps = after[1] - before[1]
    return {
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "ttft_max": max(r["ttft"] for r in results),
        "tokens_per_second_per_request": statistics.median(r["tokens_per_second"] for r in results),
        "aggregate_tokens_per_second": sum(r["tokens"] for r in results) / wall,
        "completion_tokens": sum(r["tokens"] for r in results),
        "wall_seconds": wall,
        "mean_batch_size": (after[0] - before[0]) / steps if steps else 0.0,
    }


def lathe_sequential(client, model, batch, new_tokens) -> dict:
    started = time.perf_counter()
    results = [one_request(client, model, messages, new_tokens) for messages in batch]
    wall = time.perf_counter() - started
    return {"aggregate_tokens_per_second": sum(r["tokens"] for r in results) / wall, "wall_seconds": wall,
            "ttft_p50": statistics.median(r["ttft"] for r in results)}


def hf_batch(model, tokenizer, batch, new_tokens) -> dict:
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in batch]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(input_ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - started
    generated = out.shape[1] - width
    return {"ttft": ttft, "tokens_per_second_per_request": generated / seconds,
            "aggregate_tokens_per_second": generated * len(batch) / seconds, "wall_seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--worker-metrics", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    # Warm-up: loads the model on the worker and libtorch's kernels.
    one_request(client, args.model, prompts(1)[0], 4)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    hf_batch(hf, tokenizer, prompts(1), 2)

    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        batch = prompts(c)
        concurrent = lathe_concurrent(client, args.model, batch, args.new_tokens, args.worker_metrics)
        sequential = lathe_sequential(client, args.model, batch[:min(c, 8)], args.new_tokens)
        reference = hf_batch(hf, tokenizer, batch, args.new_tokens)
        rows.append({"concurrency": c, "lathe": concurrent, "lathe_one_at_a_time": sequential, "transformers": reference})
        print(f"C={c:>3}  lathe: TTFT p50 {concurrent['ttft_p50'] * 1e3:7.0f} ms, {concurrent['tokens_per_second_per_request']:6.1f} tok/s "
              f"per request, {concurrent['aggregate_tokens_per_second']:7.1f} tok/s in all, mean batch {concurrent['mean_batch_size']:.1f} | "
              f"one at a time {sequential['aggregate_tokens_per_second']:6.1f} tok/s | transformers batch: TTFT "
              f"{reference['ttft'] * 1e3:7.0f} ms, {reference['tokens_per_second_per_request']:6.1f} tok/s per sequence, "
              f"{reference['aggregate_tokens_per_second']:7.1f} in all", flush=True)
    report = {"model": args.model, "dtype": args.dtype, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
