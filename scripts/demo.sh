#!/usr/bin/env bash
# The main job, through the service, on the built-in tiny model: start Lathe (`lathe up`:
# controller + one worker + one inference worker, on the local Postgres and Redis), create a
# random Qwen3-style model under its models root, upload the shipped CVE->CWE sample, submit a
# LoRA job, follow it with a live progress bar, print the fine-tuned model's name and where its
# adapter is, and ask the fine-tuned model a question through /v1/chat/completions.
# Runs on CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/lathe ] || { echo "demo: run scripts/setup.sh first" >&2; exit 1; }
LATHE=$PWD/target/release/lathe
source scripts/lib/services.sh
[ -n "${LATHE_DATABASE_URL:-}" ] || ensure_services

RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
DATA=$RUN/data
mkdir -p "$DATA/models"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP=127.0.0.1:$(free_port)
GRPC=127.0.0.1:$(free_port)

echo "==> tiny qwen3 model -> $DATA/models/tiny-qwen3"
$LATHE model init --arch qwen3 --preset tiny --seed 0 --out "$DATA/models/tiny-qwen3"

echo "==> lathe up (log: $RUN/service.log)"
$LATHE up --data-dir "$DATA" --http-listen "$HTTP" --grpc-listen "$GRPC" --workers 1 \
  --device auto --checkpoint-every 10 >"$RUN/service.log" 2>&1 &
UP_PID=$!
stop_service() { kill -TERM "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true; }
trap stop_service EXIT
for _ in $(seq 1 120); do
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://$HTTP/readyz', timeout=1)" 2>/dev/null; then break; fi
  kill -0 "$UP_PID" 2>/dev/null || { echo "demo: lathe up exited; see $RUN/service.log" >&2; tail -20 "$RUN/service.log" >&2; exit 1; }
  sleep 0.5
done

export LATHE_API_URL=http://$HTTP/v1
LATHE_API_KEY=$($LATHE admin create-key --project demo --name demo 2>/dev/null)
export LATHE_API_KEY

echo "==> LoRA job on examples/cve-cwe (upload, create, follow)"
$LATHE jobs create --model tiny-qwen3 \
  --training-file examples/cve-cwe/train.jsonl --validation-file examples/cve-cwe/validation.jsonl \
  --suffix cve-cwe --n-epochs 2 --batch-size 4 --learning-rate 5e-3 --max-seq-length 512 --packing \
  --watch --download "$RUN/adapter"

echo
echo "==> ask the fine-tuned model (POST /v1/chat/completions; lathe up's inference worker serves it)"
.venv/bin/python - <<'PY'
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["LATHE_API_URL"], api_key=os.environ["LATHE_API_KEY"], max_retries=0)
model = next(m.id for m in client.models.list() if m.id.startswith("ft:") and ":cve-cwe:" in m.id)
answer = client.chat.completions.create(
    model=model, temperature=0, max_tokens=24,
    messages=[{"role": "user", "content": "CVE-2021-44228: Apache Log4j2 JNDI features do not protect against attacker-controlled LDAP endpoints. Which CWE?"}])
print(f"{model} says: {answer.choices[0].message.content!r}")
print(f"usage: {answer.usage.prompt_tokens} prompt + {answer.usage.completion_tokens} completion tokens (a tiny random model: expect noise)")
PY

echo
echo "API:        $LATHE_API_URL (stopped with this script; keys: lathe admin create-key --project demo)"
echo "adapter:    $RUN/adapter (PEFT: adapter_config.json + adapter_model.safetensors; step_metrics.csv)"
echo "load it:    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('$DATA/models/tiny-qwen3'), '$RUN/adapter')"
