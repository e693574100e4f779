#!/usr/bin/env bash
# LoRA training throughput of Lathe against transformers + PEFT (docs/architecture.md §6): same weights,
# same tokens, same sequence length, batch and dtype, each in its own process, one after the
# other on this machine. Prints tokens/s, peak RSS and MFU (achieved FLOP/s over the measured
# matmul peak, see bench/flops.py for the count) per dtype, and the Lathe/HF ratios.
#
# The baseline trains on the batches Lathe dumped (debug/batches.safetensors), from Lathe's initial
# adapter and with its lr per step, so the two loss curves must agree as well.
#
#   scripts/bench.sh                      # bf16 and fp32, 3 measured steps after 1 warm-up step
#   BENCH_STEPS=10 BENCH_WARMUP=2 BENCH_DTYPES=fp32 scripts/bench.sh
#   BENCH_PROFILE=1 scripts/bench.sh      # also: both sides' last warm-up step, op by op
#
# Env: LATHE_BIN, BENCH_DIR (runs/bench), BENCH_STEPS (3), BENCH_WARMUP (1), BENCH_SEQ (512),
#      BENCH_BATCH (4), BENCH_RANK (16), BENCH_DTYPES ("bf16 fp32"), BENCH_ARCH (qwen3),
#      BENCH_PRESET (small), BENCH_PROFILE (0). Run it on an otherwise idle machine.
# Cost of one step of the small preset (103M parameters, 2048 tokens, ~1 TFLOP) on 2 cores:
# fp32 ~7-35 s; bf16 ~4-6 s with AVX512-BF16, ~10 min without it (libtorch's bf16 matmul then
# falls back to a slow kernel, see bench/matmul_peak.py), which is why bf16 is skipped there.
# The machines here are shared: per-step times of one side vary by ±15% between runs, so read
# the ratio of a run with BENCH_STEPS=8 or more, and more than one run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench}
STEPS=${BENCH_STEPS:-3}
WARMUP=${BENCH_WARMUP:-1}
SEQ=${BENCH_SEQ:-512}
BATCH=${BENCH_BATCH:-4}
RANK=${BENCH_RANK:-16}
# bf16 only where the CPU multiplies bf16 natively (or on a GPU): on AVX2-only CPUs libtorch's
# bf16 matmul is emulated at ~1/7 of fp32 speed and one step of the small model takes minutes.
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then DEFAULT_DTYPES="bf16 fp32"; else DEFAULT_DTYPES="fp32"; fi
DTYPES=${BENCH_DTYPES:-$DEFAULT_DTYPES}
ARCH=${BENCH_ARCH:-qwen3}
PRESET=${BENCH_PRESET:-small}
PROFILE=${BENCH_PROFILE:-0}
# The profiled step is the last warm-up step: not timed, and past the first step's one-time costs.
if [ "$PROFILE" = 1 ] && [ "$WARMUP" -lt 2 ]; then WARMUP=2; fi
TOTAL=$((STEPS + WARMUP))

step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

[ -x "$LATHE" ] || die "lathe binary not found at $LATHE (run scripts/setup.sh or set LATHE_BIN)"
[ -x "$PY" ] || die "no venv at $ROOT/.venv (run scripts/setup.sh)"
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) is needed for peak RSS"
mkdir -p "$DIR/results"
MODEL="$DIR/model-$ARCH-$PRESET"

if [ ! -f "$MODEL/config.json" ]; then
  step "lathe model init --arch $ARCH --preset $PRESET"
  "$LATHE" model init --arch "$ARCH" --preset "$PRESET" --seed 0 --out "$MODEL"
fi

step "data: $((TOTAL * BATCH)) rows of ~$SEQ tokens"
"$PY" bench/make_data.py --model "$MODEL" --rows $((TOTAL * BATCH)) --seq-len "$SEQ" --reserve 1 \
  --out "$DIR/data" >&2

step "matmul peak"
"$PY" bench/matmul_peak.py > "$DIR/results/matmul_peak.json"
cat "$DIR/results/matmul_peak.json" >&2
peak() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['peak_flops'])" \
  "$DIR/results/matmul_peak.json" "$1"; }

for DTYPE in $DTYPES; do
  RUN="$DIR/lathe-$DTYPE"
  rm -rf "$RUN"
  cat > "$DIR/lathe-$DTYPE.toml" <<TOML
model = "$MODEL"
train_file = "$DIR/data/train.jsonl"
output_dir = "$RUN"
method = "lora"
seed = 0

[data]
max_seq_length = $SEQ
packing = false
train_on_inputs = true

[lora]
rank = $RANK
alpha = $((2 * RANK)).0
dropout = 0.0
target_modules = "all-linear"
use_rslora = false

[optim]
learning_rate = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
max_grad_norm = 1.0
lr_scheduler = "constant"
warmup_steps = 0

[train]
epochs = 1
max_steps = $TOTAL
batch_size = $BATCH
gradient_accumulation_steps = 1
dtype = "$DTYPE"
device = "cpu"
shuffle = false
eval_every = 0
checkpoint_every = 0
gradient_checkpointing = false

[debug]
dump_batches = true
profile_step = $([ "$PROFILE" = 1 ] && echo "$WARMUP" || echo 0)

[output]
merge = false
TOML

  step "lathe train ($DTYPE)"
  /usr/bin/time -f '%M' -o "$DIR/results/$DTYPE-lathe.rss_kb" "$LATHE" train "$DIR/lathe-$DTYPE.toml" >&2
  "$PY" bench/report.py lathe-summary "$RUN" --model "$MODEL" --warmup-steps "$WARMUP" --rank "$RANK" \
    --rss-kb-file "$DIR/results/$DTYPE-lathe.rss_kb" --peak-flops "$(peak "$DTYPE")" > "$DIR/results/$DTYPE-lathe.json"

  step "transformers + peft ($DTYPE)"
  /usr/bin/time -f '%M' -o "$DIR/results/$DTYPE-hf.rss_kb" "$PY" bench/hf_baseline.py --model "$MODEL" \
    --batches "$RUN/debug/batches.safetensors" --initial-adapter "$RUN/debug/initial_adapter" \
    --events "$RUN/events.jsonl" --dtype "$DTYPE" --steps "$STEPS" --warmup-steps "$WARMUP" --rank "$RANK" \
    --alpha $((2 * RANK)) --peak-flops "$(peak "$DTYPE")" \
    $([ "$PROFILE" = 1 ] && echo "--profile $DIR/results/$DTYPE-hf-profile.json") > "$DIR/results/$DTYPE-hf.json"
  # both sides' peak RSS as measured by GNU time, the same way
  "$PY" - "$DIR/results/$DTYPE-hf.json" "$DIR/results/$DTYPE-hf.rss_kb" <<'PY'
import json, sys
path, rss = sys.argv[1], sys.argv[2]
result = json.load(open(path))
result["vmhwm_mb"] = result["peak_rss_mb"]
result["peak_rss_mb"] = int(open(rss).read().split()[-1]) / 1024
json.dump(result, open(path, "w"))
PY
done

if [ "$PROFILE" = 1 ]; then
  for DTYPE in $DTYPES; do
    step "op profile ($DTYPE, step $WARMUP)"
    "$PY" bench/profile_ops.py "$DIR/lathe-$DTYPE/debug/profile-step$WARMUP.json" "$DIR/results/$DTYPE-hf-profile.json" \
      --json "$DIR/results/$DTYPE-profile.json"
  done
fi

step "results ($STEPS measured steps, $WARMUP warm-up, seq $SEQ, batch $BATCH, LoRA r$RANK all-linear)"
"$PY" bench/report.py table "$DIR/results"
