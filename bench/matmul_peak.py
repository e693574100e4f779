"""Measured matmul peak of this machine, the denominator of MFU.

Times square matmuls with torch (the same libtorch Lathe links) for float32 and bfloat16 and
prints JSON: the best FLOP/s over sizes, layouts and repetitions, per dtype.

Three layouts, because training runs all three and CPU kernels differ a lot between them
(on an AVX2 CPU without native bf16, libtorch's bf16 fallback is ~10x slower for NN than NT):
  nt  x @ W.T     Linear forward               torch.mm(a, b.t())
  nn  g @ W       Linear backward, input grad  torch.mm(a, b)
  tn  g.T @ x     Linear backward, weight grad torch.mm(a.t(), b)

    python bench/matmul_peak.py [--sizes 1024 2048] [--seconds 3] [--threads N]
"""

import argparse
import json
import time

import torch

LAYOUTS = {
    "nt": lambda a, b: torch.mm(a, b.t()),
    "tn": lambda a, b: torch.mm(a.t(), b),
    "nn": lambda a, b: torch.mm(a, b),
}


def best_flops(n: int, dtype: torch.dtype, layout: str, seconds: float, max_reps: int) -> float:
    """Best rate over repetitions; the first (warm-up) run counts too, it is never the fastest.
    A run slower than half the budget is far from peak: measured once, not repeated."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    matmul = LAYOUTS[layout]
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps:
        start = time.perf_counter()
        matmul(a, b)
        elapsed = time.perf_counter() - start
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
        if spent >= seconds and (reps >= 3 or elapsed > seconds / 2):
            break
    return 2 * n**3 / best


def measure_dtype(dtype: torch.dtype, sizes: list[int], seconds: float, max_reps: int) -> dict:
    rates: dict[str, dict[str, float]] = {layout: {} for layout in LAYOUTS}
    best = 0.0
    for n in sorted(sizes):
        for layout in LAYOUTS:
            previous = list(rates[layout].values())
            if previous and max(previous) < 0.25 * best:
                continue  # a slow path at the smaller size; the larger one only costs time
            rates[layout][str(n)] = best_flops(n, dtype, layout, seconds, max_reps)
            best = max(best, rates[layout][str(n)])
    return {
        "peak_flops": best,
        "gflops": {layout: {n: round(f / 1e9, 2) for n, f in by_size.items()} for layout, by_size in rates.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per size, layout and dtype")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    result = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[name] = measure_dtype(dtype, args.sizes, args.seconds, args.max_reps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
