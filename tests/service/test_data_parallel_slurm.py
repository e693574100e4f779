"""Data parallel launched by Slurm: deploy/slurm/lathe-train-multinode.sbatch (`srun lathe
train …`) in a two-node allocation of the test cluster (two slurmd on this machine) trains
exactly what `lathe train --nproc 2` trains.

srun sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_STEP_NODELIST for each task. The test
cluster's node names (n1, n2) are not host names, so the batch script sets MASTER_ADDR, as a
site whose node names do not resolve would; on a real cluster the first node of the step is
used.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lathe_service import find_lathe_bin
from slurm_cluster import Node, SlurmCluster, require_slurm

EXAMPLES = [(f"Describe weakness number {i} in the parser of product {i % 5}.", f"CWE-{20 + i % 7}") for i in range(16)]


@pytest.fixture(autouse=True)
def clean_slate():
    """Overrides the suite's fixture of that name, which starts a Lathe controller and worker."""
    yield


def _losses(out: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def _config(tmp_path: Path, model: Path, name: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in EXAMPLES))
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""model = "{model}"
train_file = "{data}"
output_dir = "{tmp_path / name}"
method = "lora"
seed = 3

[lora]
rank = 4

[optim]
learning_rate = 1e-3

[train]
epochs = 3
batch_size = 2
threads = 1
device = "cpu"
dtype = "fp32"
""")
    return path


def test_srun_ranks_train_what_nproc_ranks_train(tmp_path):
    require_slurm()
    lathe = find_lathe_bin()
    model = tmp_path / "model"
    subprocess.run([str(lathe), "model", "init", "--arch", "qwen3", "--preset", "tiny", "--out", str(model)],
                   check=True, capture_output=True)
    local = subprocess.run([str(lathe), "train", str(_config(tmp_path, model, "nproc")), "--nproc", "2"],
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]

    # The shipped template, on CPU nodes: one task per node, the fake GPU each node has.
    template = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "lathe-train-multinode.sbatch"
    env = "ALL,LATHE_DEVICE=cpu,MASTER_ADDR=127.0.0.1,GLOO_SOCKET_IFNAME=lo,OMP_NUM_THREADS=1," + f"LATHE_BIN={lathe}"
    with SlurmCluster(tmp_path / "slurm", [Node("n1", gpus=1), Node("n2", gpus=1)]) as cluster:
        job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1", f"--export={env}",
                             str(template), str(_config(tmp_path, model, "srun")))
        cluster.wait_job_gone(job, timeout=300)
        output = cluster.output_of(job).read_text() if cluster.output_of(job).exists() else ""
    srun_out = tmp_path / "srun"
    assert (srun_out / "adapter" / "adapter_model.safetensors").is_file(), f"the srun job wrote no adapter:\n{output[-3000:]}"
    started = [json.loads(l) for l in (srun_out / "events.jsonl").read_text().splitlines() if '"started"' in l]
    assert started[0]["ranks"] == 2, started
    assert _losses(srun_out) == _losses(tmp_path / "nproc"), "srun and --nproc ran different trainings"
