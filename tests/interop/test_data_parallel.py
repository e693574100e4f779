"""Data parallel on CPU (c10d, Gloo): `lathe train --nproc 2` and `torchrun --no-python lathe
train` against one process.

Two ranks of batch 4 train the rows one process of batch 8 trains, divide by the same global
token count and sum their gradients before the update, so their losses must equal the single
process's up to float summation order (1e-6 relative over 20 steps), and two 2-rank runs must
be identical to the bit. Rank 0 alone writes; a run whose rank 1 is killed with SIGKILL
resumes from the last checkpoint and repeats the unbroken run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import (assert_logits_close, find_lathe_bin, hf_logits, lathe_logits, load_hf_model, load_peft_model,
                      random_input_ids, run_lathe, to_toml, train_config, write_chat_dataset)

pytestmark = pytest.mark.slow

STEPS = 20
# 16 examples, 8 per step: 2 steps per epoch.
EPOCHS = 10


def _config(tmp_path: Path, model: Path, name: str, batch: int, method: str = "lora", **train) -> Path:
    config = train_config(
        model, write_chat_dataset(tmp_path / "train.jsonl"), tmp_path / name, method=method,
        train={"epochs": EPOCHS, "max_steps": STEPS, "batch_size": batch, "threads": 1, **train},
        debug={"dump_batches": False},
        optim={"learning_rate": 1e-3 if method == "lora" else 1e-4},
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(config))
    return path


def _steps(out: Path) -> dict[int, dict]:
    """The last step event of each step number (a resumed run repeats some)."""
    with open(out / "events.jsonl") as f:
        events = [json.loads(line) for line in f if line.strip()]
    return {e["step"]: e for e in events if e["type"] == "step"}


def _losses(out: Path) -> dict[int, float]:
    return {s: e["loss"] for s, e in _steps(out).items()}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_of_batch_4_train_as_one_process_of_batch_8(tmp_path, tiny_model, method):
    model = tiny_model("qwen3")
    run_lathe("train", _config(tmp_path, model, "one", 8, method))
    run_lathe("train", _config(tmp_path, model, "two", 4, method), "--nproc", "2")
    run_lathe("train", _config(tmp_path, model, "again", 4, method), "--nproc", "2")

    one, two, again = (_losses(tmp_path / n) for n in ("one", "two", "again"))
    worst = max(abs(two[s] - one[s]) / abs(one[s]) for s in one)
    print(f"{method}: largest relative loss difference 1×8 vs 2×4 over {STEPS} steps: {worst:.2e}")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-6 * abs(one[step]), f"step {step}: 1×8 {one[step]!r}, 2×4 {two[step]!r}"
        assert again[step] == two[step], f"step {step}: two 2-rank runs differ: {two[step]!r} vs {again[step]!r}"
    assert one[STEPS] < one[1] - 0.05, "the run did not learn; the comparison proves little"

    steps = _steps(tmp_path / "two")
    assert all(len(e["rank_step_seconds"]) == 2 for e in steps.values())
    assert all(e["all_reduce_seconds"] > 0 for e in steps.values())
    assert all(e["trained_tokens"] == _steps(tmp_path / "one")[s]["trained_tokens"] for s, e in steps.items())
    started = [json.loads(l) for l in open(tmp_path / "two" / "events.jsonl") if '"started"' in l]
    assert started[0]["ranks"] == 2

    weights = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    a, b = load_file(tmp_path / "two" / weights), load_file(tmp_path / "again" / weights)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "two 2-rank runs wrote different weights"


def test_the_2_rank_adapter_loads_in_peft_and_gives_lathes_logits(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    run_lathe("train", _config(tmp_path, model, "two", 4), "--nproc", "2")
    adapter = tmp_path / "two" / "adapter"
    peft = load_peft_model(model, adapter)
    ids = random_input_ids(peft.get_base_model().config.vocab_size)
    expected = hf_logits(peft, ids)
    assert_logits_close(lathe_logits(tmp_path / "fwd", model, ids, adapter=adapter), expected, 1e-4, "2-rank adapter in PEFT")
    base = hf_logits(load_hf_model(model), ids)
    assert (expected - base).abs().max().item() > 1e-3, "the adapter changes nothing; the check is empty"


def _start_two_ranks(config: Path, out: Path, steps: int) -> subprocess.Popen:
    """`lathe train --nproc 2` in the background, returned once it has logged `steps` steps."""
    proc = subprocess.Popen([str(find_lathe_bin()), "train", str(config), "--nproc", "2", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(_losses(out) if (out / "events.jsonl").exists() else {}) < steps:
        time.sleep(0.05)
    return proc


def _child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_a_rank_killed_with_sigkill_resumes_from_the_checkpoint_and_repeats_the_unbroken_run(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    run_lathe("train", _config(tmp_path, model, "straight", 4, checkpoint_every=5), "--nproc", "2")
    straight = _losses(tmp_path / "straight")

    config = _config(tmp_path, model, "killed", 4, checkpoint_every=5)
    out = tmp_path / "killed"
    proc = _start_two_ranks(config, out, steps=7)
    children = _child_pids(proc.pid)
    assert len(children) == 1, f"expected one child rank of {proc.pid}, found {children}"
    os.kill(children[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 130), f"rank 0 went on after rank 1 died: exit {proc.returncode}"
    killed_at = max(_losses(out))
    assert killed_at < STEPS, "the run finished before the kill; the test proves nothing"
    assert (out / "checkpoints" / "step-000005" / "state.json").is_file(), stderr[-2000:]
    assert not (out / "adapter").exists(), "a failed run must not write final outputs"

    alone = subprocess.run([str(find_lathe_bin()), "train", str(config), "--resume"], capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "--nproc 2" in alone.stderr, f"a 2-rank checkpoint resumed on 1 rank: {alone.stderr[-1000:]}"
    run_lathe("train", config, "--resume", "--nproc", "2")
    resumed = _losses(out)
    assert sorted(resumed) == sorted(straight)
    for step, loss in straight.items():
        assert resumed[step] == loss, f"step {step}: unbroken {loss!r}, resumed {resumed[step]!r}"
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_torchrun_launches_the_same_run(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    run_lathe("train", _config(tmp_path, model, "nproc", 4), "--nproc", "2")
    torchrun = Path(os.environ.get("VIRTUAL_ENV", Path(find_lathe_bin()).parents[2] / ".venv")) / "bin" / "torchrun"
    if not torchrun.exists():
        torchrun = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(find_lathe_bin()),
           "train", str(_config(tmp_path, model, "torchrun", 4))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, NO_COLOR="1"))
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    a, b = _losses(tmp_path / "nproc"), _losses(tmp_path / "torchrun")
    assert a == b, "torchrun and --nproc ran different trainings"
    assert not list((tmp_path / "torchrun").glob("events.jsonl.*")), "only rank 0 writes"


def test_sigterm_to_rank_0_stops_every_rank_at_a_checkpoint_and_resume_matches(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    run_lathe("train", _config(tmp_path, model, "straight", 4), "--nproc", "2")
    straight = _losses(tmp_path / "straight")

    config = _config(tmp_path, model, "stopped", 4)
    out = tmp_path / "stopped"
    proc = _start_two_ranks(config, out, steps=5)
    children = _child_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"expected exit 130 after SIGTERM, got {proc.returncode}: {stderr[-2000:]}"
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a child rank outlived the stop"
    stopped_at = max(_losses(out))
    assert stopped_at < STEPS, "the run finished before SIGTERM arrived; the test proves nothing"
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "state.json").is_file(), stderr[-2000:]

    run_lathe("train", config, "--resume", "--nproc", "2")
    assert _losses(out) == straight
