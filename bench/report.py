"""Benchmark bookkeeping for scripts/bench.sh.

    report.py lathe-summary RUN_DIR --model DIR --warmup-steps W --rss-kb-file F [--peak-flops X]
        Scores a `lathe train` run like bench/hf_baseline.py scores itself; prints JSON.
    report.py table RESULTS_DIR
        Reads {dtype}-lathe.json / {dtype}-hf.json and matmul_peak.json; prints the side-by-side table.

Lathe's tokens/s: per measured step (step > W), the real input tokens of the step come from the
batches Lathe dumped (attention_mask sum) and the step's duration from its step event:
`step_seconds` if present, else tokens / `tokens_per_second` (which assumes Lathe's tokens/s counts
the step's real input tokens over the step's wall time). Measured tokens / measured seconds, as
the baseline does it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402


def step_tokens(run_dir: Path) -> dict[int, int]:
    tokens: dict[int, int] = {}
    for key, tensor in load_file(str(run_dir / "debug" / "batches.safetensors")).items():
        step, _micro, field = key.split(".")
        if field == "attention_mask":
            tokens[int(step[4:])] = tokens.get(int(step[4:]), 0) + int(tensor.sum())
    return tokens


def lathe_summary(args) -> dict:
    run_dir = Path(args.run_dir)
    events = [json.loads(line) for line in open(run_dir / "events.jsonl") if line.strip()]
    steps = [e for e in events if e.get("type") == "step"]
    tokens = step_tokens(run_dir)
    measured = [e for e in steps if e["step"] > args.warmup_steps]
    assert measured, f"no step after warm-up {args.warmup_steps} in {run_dir}"
    seconds = 0.0
    for e in measured:
        if e.get("step_seconds"):
            seconds += e["step_seconds"]
        else:
            seconds += tokens[e["step"]] / e["tokens_per_second"]
    measured_tokens = sum(tokens[e["step"]] for e in measured)
    tokens_per_second = measured_tokens / seconds
    seq_len = next(t for k, t in load_file(str(run_dir / "debug" / "batches.safetensors")).items()
                   if k.endswith("input_ids")).shape[1]
    count = flops.count_for_model(args.model, seq_len, args.rank)
    achieved = tokens_per_second * count["flops_per_token"]
    rss_kb = int(Path(args.rss_kb_file).read_text().strip().splitlines()[-1])
    return {
        "impl": "lathe",
        "steps": len(measured),
        "warmup_steps": args.warmup_steps,
        "seq_len": seq_len,
        "tokens_per_step": [tokens[e["step"]] for e in measured],
        "tokens_per_second": tokens_per_second,
        "seconds_per_step": seconds / len(measured),
        "peak_rss_mb": rss_kb / 1024,
        "losses": [e["loss"] for e in steps],
        "flops_per_token": count["flops_per_token"],
        "flops_formula": count["formula"],
        "achieved_flops_per_second": achieved,
        "mfu": achieved / args.peak_flops if args.peak_flops else None,
    }


def max_rel_diff(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])) if n else float("nan")


def table(args):
    results = Path(args.results_dir)
    peak = json.loads((results / "matmul_peak.json").read_text())
    print(f"matmul peak ({peak['threads']} threads, {peak['cpu_capability']}): "
          f"fp32 {peak['fp32']['peak_flops'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16']['peak_flops'] / 1e9:.1f} GFLOP/s")
    header = f"{'dtype':5} {'impl':18} {'tokens/s':>10} {'s/step':>8} {'peak RSS MB':>12} {'GFLOP/s':>8} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    ratios = []
    for dtype in ("bf16", "fp32"):
        rows = {}
        for impl in ("lathe", "hf"):
            path = results / f"{dtype}-{impl}.json"
            if path.is_file():
                rows[impl] = json.loads(path.read_text())
        for impl, r in rows.items():
            mfu = r["achieved_flops_per_second"] / peak[dtype]["peak_flops"]
            name = "lathe" if impl == "lathe" else "transformers+peft"
            print(f"{dtype:5} {name:18} {r['tokens_per_second']:10.1f} {r['seconds_per_step']:8.2f} "
                  f"{r['peak_rss_mb']:12.0f} {r['achieved_flops_per_second'] / 1e9:8.2f} {mfu:7.1%}")
        if len(rows) == 2:
            lathe, hf = rows["lathe"], rows["hf"]
            ratios.append(f"{dtype}: Lathe/HF tokens/s {lathe['tokens_per_second'] / hf['tokens_per_second']:.2f}x, "
                          f"peak RSS {lathe['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x, "
                          f"max rel loss diff over {min(len(lathe['losses']), len(hf['losses']))} steps "
                          f"{max_rel_diff(lathe['losses'], hf['losses']):.1e}")
    print()
    print("\n".join(ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("lathe-summary")
    summary.add_argument("run_dir")
    summary.add_argument("--model", required=True)
    summary.add_argument("--warmup-steps", type=int, required=True)
    summary.add_argument("--rss-kb-file", required=True, help="/usr/bin/time -f %%M output")
    summary.add_argument("--rank", type=int, default=16)
    summary.add_argument("--peak-flops", type=float)
    tab = sub.add_parser("table")
    tab.add_argument("results_dir")
    args = parser.parse_args()
    if args.command == "lathe-summary":
        print(json.dumps(lathe_summary(args)))
    else:
        table(args)


if __name__ == "__main__":
    main()
