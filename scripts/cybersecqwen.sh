#!/usr/bin/env bash
# The CyberSecQwen-4B recipe as a preset: CVE->CWE training data decontaminated against
# CTI-RCM, LoRA rank 64 on every linear layer, lr 5e-5, 10 epochs, bf16, then evaluation on
# CTI-MCQ and CTI-RCM (0-shot, greedy) of the base model and of base + adapter, side by side.
#
#   MODEL=/models/Qwen3-4B-Instruct-2507 scripts/cybersecqwen.sh   # the real recipe: a 40 GB+ GPU
#   scripts/cybersecqwen.sh                                         # the same steps scaled to the tiny model on CPU
#
# Needs: the model in Hugging Face layout (safetensors) when MODEL is set; the CVE->CWE set and
# CTIBench (CC BY-NC-SA 4.0, not shipped) — defaults ../shared/datasets/{cve-cwe,ctibench},
# override with CVE_CWE=… CTIBENCH=…. Output in runs/cybersecqwen-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
LATHE=${LATHE_BIN:-$PWD/target/release/lathe}
[ -x "$LATHE" ] || { echo "cybersecqwen: run scripts/setup.sh first" >&2; exit 1; }
CVE_CWE=${CVE_CWE:-../shared/datasets/cve-cwe/cybersecqwen_rcm_2021_train.jsonl}
CTIBENCH=${CTIBENCH:-../shared/datasets/ctibench}
RUN=${RUN:-runs/cybersecqwen-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN"
for f in "$CVE_CWE" "$CTIBENCH/cti-rcm.tsv" "$CTIBENCH/cti-mcq.tsv"; do
  [ -f "$f" ] || { echo "cybersecqwen: $f not found (set CVE_CWE / CTIBENCH)" >&2; exit 1; }
done

if [ -n "${MODEL:-}" ]; then
  # The published recipe.
  PRESET=examples/presets/cybersecqwen-4b.toml; ROWS=0; EVAL_LIMIT=${EVAL_LIMIT:-}
else
  # Scaled to CPU: the tiny random model, a slice of the data, a higher rate, few steps.
  MODEL=$RUN/tiny-qwen3
  "$LATHE" model init --arch qwen3 --preset tiny --out "$MODEL" >/dev/null
  PRESET=examples/presets/cybersecqwen-tiny.toml; ROWS=600; EVAL_LIMIT=${EVAL_LIMIT:-40}
fi

echo "==> decontaminating $CVE_CWE against CTI-RCM"
"$LATHE" eval contamination --training-file "$CVE_CWE" --benchmarks cti-rcm --data-dir "$CTIBENCH" \
  --out "$RUN/train.clean.jsonl"
# The set is {"prompt", "response"}: as chat turns, so the model's own template frames them.
.venv/bin/python - "$RUN/train.clean.jsonl" "$RUN/train.jsonl" "$ROWS" <<'PY'
import json, sys
src, dst, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [json.loads(l) for l in open(src) if l.strip()]
lines = lines[:rows] if rows else lines
with open(dst, "w") as out:
    for r in lines:
        out.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]}]}) + "\n")
print(f"{len(lines)} chat examples -> {dst}")
PY

sed -e "s#@MODEL@#$(realpath "$MODEL")#" -e "s#@TRAIN@#$(realpath "$RUN/train.jsonl")#" -e "s#@OUT@#$(realpath "$RUN")/out#" \
  "$PRESET" > "$RUN/train.toml"
echo "==> training ($PRESET)"
"$LATHE" train "$RUN/train.toml"

LIMIT_ARGS=()
[ -n "$EVAL_LIMIT" ] && LIMIT_ARGS=(--limit "$EVAL_LIMIT")
echo "==> evaluating the base model"
"$LATHE" eval run --model "$MODEL" --data-dir "$CTIBENCH" --benchmarks cti-mcq,cti-rcm "${LIMIT_ARGS[@]}" --out "$RUN/eval-base.json"
echo "==> evaluating base + adapter"
"$LATHE" eval run --model "$MODEL" --adapter "$RUN/out/adapter" --data-dir "$CTIBENCH" --benchmarks cti-mcq,cti-rcm \
  "${LIMIT_ARGS[@]}" --out "$RUN/eval-tuned.json"
echo "==> base (A) vs base + adapter (B)"
"$LATHE" eval compare "$RUN/eval-base.json" "$RUN/eval-tuned.json"
echo "results: $RUN/eval-base.json and $RUN/eval-tuned.json (protocol and per-item outputs in each)"
