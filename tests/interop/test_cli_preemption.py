"""Preemption as Slurm or Kubernetes does it: SIGTERM to `lathe train` mid-run writes a
checkpoint and exits 130; `lathe train --resume` then finishes with exactly the losses of an
uninterrupted run."""

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import find_lathe_bin, run_lathe, to_toml, train_config, write_chat_dataset


def _config(tmp_path: Path, model: Path, name: str) -> Path:
    config = train_config(
        model, write_chat_dataset(tmp_path / "train.jsonl"), tmp_path / name,
        train={"epochs": 4, "batch_size": 1, "threads": 1},
        debug={"dump_batches": False},
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(config))
    return path


def _losses(output_dir: Path) -> dict[int, float]:
    with open(output_dir / "events.jsonl") as f:
        events = [json.loads(line) for line in f if line.strip()]
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    straight = _losses_of_full_run(tmp_path, model)

    config = _config(tmp_path, model, "preempted")
    out = tmp_path / "preempted"
    proc = subprocess.Popen([str(find_lathe_bin()), "train", str(config), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(out) if (out / "events.jsonl").exists() else {}) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"expected exit 130 after SIGTERM, got {proc.returncode}: {stderr[-2000:]}"
    stopped_at = max(_losses(out))
    assert stopped_at < max(straight), "the run finished before SIGTERM arrived; the test proves nothing"
    checkpoint = out / "checkpoints" / f"step-{stopped_at:06d}"
    assert (checkpoint / "state.json").is_file(), f"no checkpoint at {checkpoint}: {stderr[-2000:]}"
    assert f"--resume-from {checkpoint}" in stderr
    assert not (out / "adapter").exists(), "a stopped run must not write final outputs"

    run_lathe("train", config, "--resume")
    resumed = _losses(out)
    assert sorted(resumed) == sorted(straight)
    for step, loss in straight.items():
        assert resumed[step] == loss, f"step {step}: uninterrupted {loss!r}, resumed {resumed[step]!r}"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _losses_of_full_run(tmp_path: Path, model: Path) -> dict[int, float]:
    run_lathe("train", _config(tmp_path, model, "straight"))
    return _losses(tmp_path / "straight")
