#!/usr/bin/env bash
# QLoRA's memory and speed against LoRA (docs/qlora.md): the same model, tokens, seq, batch and
# dtype, each `lathe train` in its own process, one after the other on this machine, with and
# without gradient checkpointing. Prints peak RSS (GNU time), tokens/s (median of the measured
# steps), the ratios, and the RSS of `lathe --help` (what libtorch and its CUDA libraries cost
# before any model is loaded).
#
#   scripts/bench_qlora.sh                       # small preset, bf16 where the CPU has it natively
#   BENCH_DTYPE=fp32 BENCH_PRESET=tiny scripts/bench_qlora.sh
#   BENCH_DTYPE=bf16 BENCH_PRESET=4b BENCH_SEQ=8 BENCH_BATCH=1 BENCH_STEPS=1 BENCH_CKPT=true scripts/bench_qlora.sh
#       # Qwen3-4B's shapes (8 GB in bf16; ~20 GB of free memory and disk; ~25 min on 2 cores)
#
# Env: LATHE_BIN, BENCH_DIR (runs/bench-qlora), BENCH_STEPS (3), BENCH_SEQ (512), BENCH_BATCH (4),
#      BENCH_RANK (16), BENCH_PRESET (small), BENCH_DTYPE (bf16 with AVX512-BF16/AMX, else fp32),
#      BENCH_CKPT (the gradient checkpointing settings to run: "false true").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench-qlora}
STEPS=${BENCH_STEPS:-3}
SEQ=${BENCH_SEQ:-512}
BATCH=${BENCH_BATCH:-4}
RANK=${BENCH_RANK:-16}
PRESET=${BENCH_PRESET:-small}
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then DEFAULT_DTYPE=bf16; else DEFAULT_DTYPE=fp32; fi
DTYPE=${BENCH_DTYPE:-$DEFAULT_DTYPE}
CKPTS=${BENCH_CKPT:-false true}
for CKPT in $CKPTS; do
  case "$CKPT" in true | false) ;; *) echo "bench_qlora: BENCH_CKPT holds \`$CKPT\`; use true and/or false" >&2; exit 1 ;; esac
done

die() { echo "bench_qlora: $*" >&2; exit 1; }
[ -x "$LATHE" ] || die "lathe binary not found at $LATHE (run scripts/setup.sh or set LATHE_BIN)"
[ -x "$PY" ] || die "no venv at $ROOT/.venv (run scripts/setup.sh)"
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) is needed for peak RSS"
mkdir -p "$DIR/results"
MODEL="$DIR/model-qwen3-$PRESET"
[ -f "$MODEL/config.json" ] || "$LATHE" model init --arch qwen3 --preset "$PRESET" --seed 0 --out "$MODEL" >&2
"$PY" bench/make_data.py --model "$MODEL" --rows $((STEPS * BATCH)) --seq-len "$SEQ" --reserve 1 --out "$DIR/data" >&2

/usr/bin/time -f '%M' -o "$DIR/results/baseline.rss_kb" "$LATHE" --help > /dev/null

for CKPT in $CKPTS; do
  for QUANT in none nf4; do
    NAME="$QUANT-ckpt-$CKPT"
    rm -rf "${DIR:?}/$NAME"
    {
      echo "model = \"$MODEL\""
      echo "train_file = \"$DIR/data/train.jsonl\""
      echo "output_dir = \"$DIR/$NAME\""
      [ "$QUANT" = nf4 ] && echo 'quantization = "nf4"'
      printf '[data]\nmax_seq_length = %s\ntrain_on_inputs = true\n' "$SEQ"
      printf '[lora]\nrank = %s\nalpha = %s.0\n' "$RANK" $((2 * RANK))
      printf '[optim]\nlr_scheduler = "constant"\nwarmup_steps = 0\n'
      printf '[train]\nmax_steps = %s\nbatch_size = %s\ndtype = "%s"\ndevice = "cpu"\nshuffle = false\n' \
        "$STEPS" "$BATCH" "$DTYPE"
      printf 'gradient_checkpointing = %s\n' "$CKPT"
    } > "$DIR/$NAME.toml"
    echo "==> lathe train ($NAME, $DTYPE)" >&2
    /usr/bin/time -f '%M' -o "$DIR/results/$NAME.rss_kb" "$LATHE" train "$DIR/$NAME.toml" > /dev/null
  done
done

"$PY" - "$DIR" "$STEPS" "$SEQ" "$BATCH" "$RANK" "$PRESET" "$DTYPE" "$CKPTS" <<'PY'
import json, statistics, sys
from pathlib import Path

d, steps, seq, batch, rank, preset, dtype, ckpts = sys.argv[1:]
d = Path(d)
rss = lambda name: int((d / "results" / f"{name}.rss_kb").read_text().split()[-1]) / 1024
def rate(name):
    events = [json.loads(l) for l in (d / name / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e.get("type") == "step"]
    return statistics.median(e["tokens_per_second"] for e in steps[1:] or steps), steps[-1]["loss"]
base = rss("baseline")
print(f"\nQLoRA vs LoRA: {preset} preset, {dtype}, LoRA r{rank} all-linear, seq {seq}, batch {batch}, {steps} steps")
print(f"`lathe --help` peak RSS (libraries, before any model): {base:,.0f} MB\n")
print("| gradient checkpointing | run | peak RSS MB | above `lathe --help` MB | tokens/s | last loss |")
print("|---|---|---|---|---|---|")
for ckpt in ckpts.split():
    lora, qlora = f"none-ckpt-{ckpt}", f"nf4-ckpt-{ckpt}"
    for label, name in (("bf16 LoRA" if dtype == "bf16" else f"{dtype} LoRA", lora), ("NF4 QLoRA", qlora)):
        r, loss = rate(name)
        shown = f"{r:,.0f}" if r >= 10 else f"{r:.3g}"  # a 4b step on a CPU is well under 1 token/s
        print(f"| {ckpt} | {label} | {rss(name):,.0f} | {rss(name) - base:,.0f} | {shown} | {loss:.4f} |")
    ratio = rss(qlora) / rss(lora)
    above = (rss(qlora) - base) / (rss(lora) - base)
    print(f"| {ckpt} | QLoRA / LoRA | {ratio:.2f}x | {above:.2f}x | {rate(qlora)[0] / rate(lora)[0]:.2f}x | |")
PY
