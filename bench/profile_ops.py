"""Where one training step's time goes, op by op: Lathe's trace (`[debug] profile_step`, written by
libtorch's profiler) beside transformers + PEFT's (`hf_baseline.py --profile`, torch.profiler).
Both are Chrome traces of the same format; each op's self time (its duration minus the ops it
called) is summed by name, then by kind of work.

    python bench/profile_ops.py LATHE_TRACE HF_TRACE [--top 25] [--json OUT]
"""

import argparse
import collections
import json
import sys

# Kind of work by op name; the first matching rule wins.
CATEGORIES = [
    ("attention", ("flash_attention", "scaled_dot_product", "_efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("norm (fused)", ("lathe::rms_norm", "RmsNorm")),
    ("swiglu (fused)", ("lathe::swiglu", "SwiGlu")),
    ("loss", ("softmax", "logsumexp", "nll_loss", "cross_entropy", "LinearCrossEntropy")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
                          "aten::block_diag", "aten::index", "aten::embedding")),
    ("allocation", ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::ones", "aten::resize_")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::pow",
                     "aten::rsqrt", "aten::sqrt", "aten::mean", "aten::sum", "aten::lerp", "aten::addcmul",
                     "aten::addcdiv", "aten::where", "aten::cos", "aten::sin", "aten::exp", "aten::_foreach",
                     "aten::clamp", "aten::norm", "aten::linalg_vector_norm", "aten::maximum", "aten::reciprocal")),
]


def category(name: str) -> str:
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return "other"


def self_times(path: str) -> tuple[dict[str, float], float]:
    """Self time in ms per op name, and the wall time the trace's top-level ops cover."""
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[e.get("tid")].append(e)
    totals: dict[str, float] = collections.Counter()
    covered = 0.0
    for events in by_thread.values():
        # Parents before children: start ascending, longer first on ties.
        events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [end, name, self]
        def close(until: float):
            while stack and stack[-1][0] <= until:
                end, name, own = stack.pop()
                totals[name] += own
        for e in events:
            start, dur = float(e["ts"]), float(e["dur"])
            close(start)
            if stack:
                stack[-1][2] -= dur
            else:
                covered += dur
            stack.append([start + dur, e["name"], dur])
        close(float("inf"))
    return {k: v / 1000.0 for k, v in totals.items()}, covered / 1000.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lathe", help="Lathe's Chrome trace (output_dir/debug/profile-stepN.json)")
    parser.add_argument("hf", help="transformers + PEFT's Chrome trace (hf_baseline.py --profile)")
    parser.add_argument("--top", type=int, default=25, help="ops listed by name")
    parser.add_argument("--json", help="also write the tables here")
    args = parser.parse_args()

    lathe, lathe_total = self_times(args.lathe)
    hf, hf_total = self_times(args.hf)
    cats = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ms in lathe.items():
        cats[category(name)][0] += ms
    for name, ms in hf.items():
        cats[category(name)][1] += ms

    def pct(ms, total):
        return f"{100 * ms / total:.1f}%" if total else "-"

    print(f"\nOne step, self time by kind of work (Lathe {lathe_total:.0f} ms, transformers+PEFT {hf_total:.0f} ms)\n")
    print("| kind of work | Lathe ms | share | HF+PEFT ms | share | Lathe − HF ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (a, b) in sorted(cats.items(), key=lambda kv: -max(kv[1])):
        print(f"| {label} | {a:.0f} | {pct(a, lathe_total)} | {b:.0f} | {pct(b, hf_total)} | {a - b:+.0f} |")

    names = sorted(set(lathe) | set(hf), key=lambda n: -max(lathe.get(n, 0.0), hf.get(n, 0.0)))[: args.top]
    print(f"\nTop {len(names)} ops by self time\n")
    print("| op | kind | Lathe ms | HF+PEFT ms |")
    print("|---|---|---:|---:|")
    for n in names:
        print(f"| `{n}` | {category(n)} | {lathe.get(n, 0.0):.1f} | {hf.get(n, 0.0):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lathe_ms": lathe, "hf_ms": hf, "lathe_total_ms": lathe_total, "hf_total_ms": hf_total,
                       "categories": {k: {"lathe_ms": v[0], "hf_ms": v[1]} for k, v in cats.items()}}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
