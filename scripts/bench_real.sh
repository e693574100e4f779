#!/usr/bin/env bash
# Fine-tuning on real data as users run it (docs/architecture.md §6): the CVE→CWE training set
# (rows of ~100-300 tokens, as chat turns), LoRA r16 on every linear layer of the small preset,
# one pass over the rows, in one run on this machine, one after the other:
#
#   lathe         Lathe with packing (rows packed into 512-token sequences, attention kept
#                 inside each row)
#   trl-packing   TRL's SFTTrainer, packing=True (its default strategy), same sequence length
#   trl-padding   TRL's SFTTrainer without packing: each batch padded to its longest row
#   hf-padding    a plain transformers + PEFT loop, each batch padded to its longest row
#
# Same learning rate (constant), AdamW, clip 1.0, loss on every token of a row, the model's chat
# template; packed runs take 4 sequences of 512 per step, padded runs 16 rows per step. Prints
# wall-clock, trained tokens/s, peak RSS (GNU time) and the final loss, as a table.
#
#   scripts/bench_real.sh                    # the first 512 rows (BENCH_ROWS=0: the whole set)
#   BENCH_MODES="lathe hf-padding" scripts/bench_real.sh
#
# Env: LATHE_BIN, BENCH_DIR (runs/bench-real), BENCH_ROWS (512), BENCH_DTYPE (bf16 where the CPU
#      multiplies bf16 natively, else fp32), BENCH_MODES (all four), CVE_CWE (the set's path).
# Needs TRL (bench/requirements-trl.txt), installed into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
LATHE=${LATHE_BIN:-$ROOT/target/release/lathe}
DIR=${BENCH_DIR:-$ROOT/runs/bench-real}
ROWS=${BENCH_ROWS:-512}
CVE_CWE=${CVE_CWE:-$ROOT/../shared/datasets/cve-cwe/cybersecqwen_rcm_2021_train.jsonl}
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then DEFAULT_DTYPE=bf16; else DEFAULT_DTYPE=fp32; fi
DTYPE=${BENCH_DTYPE:-$DEFAULT_DTYPE}
MODES=${BENCH_MODES:-lathe trl-packing trl-padding hf-padding}
SEQ=512 PACKED_BATCH=4 PADDED_BATCH=16 RANK=16 LR=1e-4

step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "bench_real: $*" >&2; exit 1; }

[ -x "$LATHE" ] || die "lathe binary not found at $LATHE (run scripts/setup.sh or set LATHE_BIN)"
[ -x "$PY" ] || die "no venv at $ROOT/.venv (run scripts/setup.sh)"
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) is needed for peak RSS"
[ -f "$CVE_CWE" ] || die "$CVE_CWE not found (set CVE_CWE)"
if [[ " $MODES " == *" trl-"* ]] && ! "$PY" -c "import trl" 2>/dev/null; then
  step "installing TRL into .venv (bench/requirements-trl.txt)"
  "$PY" -m pip install -q -r bench/requirements-trl.txt
fi
mkdir -p "$DIR/results"
MODEL="$DIR/model-qwen3-small"
if [ ! -f "$MODEL/config.json" ]; then
  step "lathe model init --arch qwen3 --preset small"
  "$LATHE" model init --arch qwen3 --preset small --seed 0 --out "$MODEL"
fi

step "data: $([ "$ROWS" = 0 ] && echo all || echo "the first $ROWS") rows of $(basename "$CVE_CWE") as chat turns"
"$PY" - "$CVE_CWE" "$DIR/train.jsonl" "$ROWS" <<'PY'
import json, sys
src, dst, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [json.loads(l) for l in open(src) if l.strip()]
lines = lines[:rows] if rows else lines
with open(dst, "w") as out:
    for r in lines:
        out.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]}]}) + "\n")
print(f"{len(lines)} rows -> {dst}", file=sys.stderr)
PY

for MODE in $MODES; do
  step "$MODE ($DTYPE)"
  RSS="$DIR/results/$MODE.rss_kb"
  if [ "$MODE" = lathe ]; then
    RUN="$DIR/lathe"
    rm -rf "$RUN"
    cat > "$DIR/lathe.toml" <<TOML
model = "$MODEL"
train_file = "$DIR/train.jsonl"
output_dir = "$RUN"
method = "lora"
seed = 0

[data]
max_seq_length = $SEQ
packing = true
train_on_inputs = true

[lora]
rank = $RANK
alpha = $((2 * RANK)).0
dropout = 0.0
target_modules = "all-linear"

[optim]
learning_rate = $LR
weight_decay = 0.0
max_grad_norm = 1.0
lr_scheduler = "constant"
warmup_steps = 0

[train]
epochs = 1
batch_size = $PACKED_BATCH
gradient_accumulation_steps = 1
dtype = "$DTYPE"
device = "cpu"
shuffle = false
eval_every = 0
checkpoint_every = 0

[output]
merge = false
TOML
    /usr/bin/time -f '%M' -o "$RSS" "$LATHE" train "$DIR/lathe.toml" >&2
    "$PY" - "$RUN/events.jsonl" > "$DIR/results/$MODE.json" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [e for e in events if e.get("type") == "step"]
tokens = sum(e["trained_tokens"] for e in steps)
seconds = steps[-1]["elapsed_seconds"]
print(json.dumps({"impl": "lathe", "seconds": seconds, "trained_tokens": tokens, "steps": len(steps),
                  "losses": [e["loss"] for e in steps], "tokens_per_second": tokens / seconds}))
PY
  else
    /usr/bin/time -f '%M' -o "$RSS" "$PY" bench/real_data_baseline.py --mode "$MODE" --model "$MODEL" \
      --data "$DIR/train.jsonl" --out "$DIR/$MODE" --dtype "$DTYPE" --max-length $SEQ --batch-size $PACKED_BATCH \
      --rows-per-batch $PADDED_BATCH --rank $RANK --lr $LR > "$DIR/results/$MODE.json"
  fi
done

step "results ($DTYPE, $(wc -l < "$DIR/train.jsonl") rows, LoRA r$RANK all-linear, lr $LR constant)"
"$PY" - "$DIR/results" $MODES <<'PY'
import json, sys
from pathlib import Path
results, modes = Path(sys.argv[1]), sys.argv[2:]
rows = []
for mode in modes:
    r = json.loads((results / f"{mode}.json").read_text().strip().splitlines()[-1])
    rss_mb = int((results / f"{mode}.rss_kb").read_text().split()[-1]) / 1024
    tail = r["losses"][-max(1, len(r["losses"]) // 4):]
    rows.append((mode, r, rss_mb, sum(tail) / len(tail)))
base = next((row for row in rows if row[0] == "lathe"), None)
print("| run | steps | wall-clock s | trained tokens | tokens/s | vs Lathe | peak RSS MB | vs Lathe | loss (last quarter of steps) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for mode, r, rss, loss in rows:
    speed = f"{base[1]['tokens_per_second'] / r['tokens_per_second']:.2f}× slower" if base and mode != "lathe" else ""
    mem = f"{rss / base[2]:.2f}×" if base and mode != "lathe" else ""
    print(f"| {mode} | {r['steps']} | {r['seconds']:.0f} | {r['trained_tokens']:,} | {r['tokens_per_second']:.0f} | "
          f"{speed} | {rss:,.0f} | {mem} | {loss:.3f} |")
PY
