"""Data-parallel scaling on this machine, and on paper for a GPU node (docs/data-parallel.md).

Measured, in one run, on the same model, rows and global batch:
  A. one process, batch B, T threads (all the cores);
  B. `lathe train --nproc R`, batch B/R per rank, T/R threads each (the same cores, split).
Reported: trained tokens/s of each (median over the steps after the first), B/A, the
all-reduce's share of B's step, the bytes summed per step, and whether the losses agree.

On paper: the gradient bytes a LoRA run all-reduces per step for a model shape, the time a ring
all-reduce takes over NVLink, and the step time at a given MFU, hence the expected efficiency.

    python bench/data_parallel_bench.py --model DIR --data runs/bench_dp/data/train.jsonl --out runs/bench_dp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

LATHE = Path(os.environ.get("LATHE_BIN", Path(__file__).resolve().parents[1] / "target" / "release" / "lathe"))

# Qwen3-4B (config.json of Qwen/Qwen3-4B): what the paper estimate is for.
QWEN3_4B = {"hidden": 2560, "intermediate": 9728, "layers": 36, "q_out": 32 * 128, "kv_out": 8 * 128, "params": 4.02e9}


def run(model: Path, data: Path, out: Path, batch: int, threads: int, steps: int, seq: int, rank: int, nproc: int) -> list[dict]:
    config = out.with_suffix(".toml")
    config.write_text(f"""model = "{model}"
train_file = "{data}"
output_dir = "{out}"
method = "lora"
seed = 0
[data]
max_seq_length = {seq}
packing = false
[lora]
rank = {rank}
alpha = {2 * rank}.0
[optim]
learning_rate = 1e-4
[train]
epochs = 100
max_steps = {steps}
batch_size = {batch}
threads = {threads}
dtype = "fp32"
device = "cpu"
shuffle = false
""")
    args = [str(LATHE), "train", str(config), "--json"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["type"] == "step"]


def lora_params(shape: dict, rank: int) -> int:
    """Trainable parameters of LoRA rank r on every linear layer: r * (in + out) per projection."""
    h, i, q, kv = shape["hidden"], shape["intermediate"], shape["q_out"], shape["kv_out"]
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return rank * per_layer * shape["layers"]


def on_paper(gpus: int, rank: int, tokens_per_gpu: int, busbw_gbs: float, peak_tflops: float, mfu: float) -> dict:
    params = lora_params(QWEN3_4B, rank)
    grad_bytes = params * 4  # fp32 gradients of the adapter
    # A ring all-reduce moves 2(n-1)/n of the buffer through each GPU's link; NCCL's "bus bandwidth".
    allreduce_s = grad_bytes * 2 * (gpus - 1) / gpus / (busbw_gbs * 1e9)
    # Frozen base: forward 2N FLOPs/token, backward only through activations, another 2N.
    step_s = 4 * QWEN3_4B["params"] * tokens_per_gpu / (peak_tflops * 1e12 * mfu)
    return {"gpus": gpus, "lora_rank": rank, "trainable_params": params, "bytes_all_reduced_per_step": grad_bytes,
            "all_reduce_ms": allreduce_s * 1e3, "compute_step_ms": step_s * 1e3,
            "efficiency_without_overlap": step_s / (step_s + allreduce_s)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="cores for the one-process run, split over ranks")
    p.add_argument("--batch", type=int, default=4, help="global batch")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for d in ("one", "ranks"):
        subprocess.run(["rm", "-rf", str(a.out / d)], check=True)
    one = run(a.model, a.data, a.out / "one", a.batch, a.threads, a.steps, a.seq, a.rank, 1)
    many = run(a.model, a.data, a.out / "ranks", a.batch // a.ranks, max(1, a.threads // a.ranks), a.steps, a.seq, a.rank, a.ranks)
    tps = lambda steps: statistics.median(e["tokens_per_second"] for e in steps[1:])
    reduce = statistics.median(e["all_reduce_seconds"] for e in many[1:])
    step = statistics.median(max(e["rank_step_seconds"]) + e["all_reduce_seconds"] for e in many[1:])
    straggle = statistics.median(max(e["rank_step_seconds"]) / min(e["rank_step_seconds"]) for e in many[1:])
    worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(many, one))
    started = json.loads(next(l for l in (a.out / "ranks" / "events.jsonl").read_text().splitlines() if '"started"' in l))
    trainable = started["trainable_parameters"]
    result = {
        "measured": {
            "one_process": {"threads": a.threads, "batch": a.batch, "tokens_per_second": tps(one)},
            "ranks": {"ranks": a.ranks, "threads_each": max(1, a.threads // a.ranks), "batch_each": a.batch // a.ranks,
                      "tokens_per_second": tps(many), "backend": started["dist_backend"]},
            "ratio_ranks_over_one": tps(many) / tps(one),
            "all_reduce_ms": reduce * 1e3, "all_reduce_share_of_step": reduce / step,
            "slowest_over_fastest_rank": straggle,
            "bytes_all_reduced_per_step": trainable * 4,
            "worst_relative_loss_difference": worst,
        },
        "on_paper_qwen3_4b_lora_r64_8xh100": on_paper(8, 64, tokens_per_gpu=8 * 2048, busbw_gbs=360, peak_tflops=989, mfu=0.4),
    }
    (a.out / "data_parallel.json").write_text(json.dumps(result, indent=2))
    m, paper = result["measured"], result["on_paper_qwen3_4b_lora_r64_8xh100"]
    print(f"| run | tokens/s |\n|---|---|\n| 1 process × {a.threads} threads, batch {a.batch} | {tps(one):,.0f} |")
    print(f"| {a.ranks} ranks × {m['ranks']['threads_each']} thread ({m['ranks']['backend']}), batch {m['ranks']['batch_each']} each | {tps(many):,.0f} |")
    print(f"\nranks / one process: {m['ratio_ranks_over_one']:.2f}x; all-reduce {m['all_reduce_ms']:.1f} ms "
          f"= {m['all_reduce_share_of_step']:.1%} of a step ({m['bytes_all_reduced_per_step'] / 2**20:.1f} MiB summed); "
          f"slowest/fastest rank {straggle:.2f}; losses agree to {worst:.1e}")
    print(f"\non paper, Qwen3-4B LoRA r64 on 8×H100 (NCCL ring, {360} GB/s bus bandwidth, 8×2048 tokens per GPU, 40% MFU): "
          f"{paper['bytes_all_reduced_per_step'] / 2**20:.0f} MiB of fp32 gradients per step, all-reduce "
          f"{paper['all_reduce_ms']:.1f} ms against {paper['compute_step_ms']:.0f} ms of compute: "
          f"{paper['efficiency_without_overlap']:.1%} scaling efficiency even without overlapping the two")


if __name__ == "__main__":
    main()
