#!/usr/bin/env bash
# The main job on the built-in tiny model: create a random Qwen3-style model, LoRA fine-tune
# it on the shipped CVE->CWE sample with a live progress bar, and print where the PEFT
# adapter, merged model and loss curve are. Runs on CPU in well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/lathe ] || { echo "demo: run scripts/setup.sh first" >&2; exit 1; }
LATHE=target/release/lathe
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN"

echo "==> tiny qwen3 model -> $RUN/model"
$LATHE model init --arch qwen3 --preset tiny --seed 0 --out "$RUN/model"

cat > "$RUN/train.toml" <<TOML
model = "model"
train_file = "$PWD/examples/cve-cwe/train.jsonl"
validation_file = "$PWD/examples/cve-cwe/validation.jsonl"
output_dir = "out"
method = "lora"
seed = 0

[data]
max_seq_length = 512
packing = true

[lora]
rank = 16
alpha = 32.0
target_modules = "all-linear"

[optim]
learning_rate = 5e-3
lr_scheduler = "cosine"
warmup_ratio = 0.05

[train]
epochs = 2
batch_size = 4
dtype = "auto"
device = "auto"
eval_every = 10
checkpoint_every = 20
keep_checkpoints = 2

[output]
merge = true
TOML

echo "==> LoRA fine-tuning ($RUN/train.toml)"
$LATHE train "$RUN/train.toml"
echo
echo "loss curve: $RUN/out/results.csv"
