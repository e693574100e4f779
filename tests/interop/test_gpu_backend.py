"""`lathe` carries libtorch's GPU backend, and never trains on the CPU of a GPU host by accident.

No machine here has a GPU, so what would break on one is checked without it: the binary's ELF
dependencies and the libraries a running `lathe` loads must include the backend library that
the linked libtorch ships (`libtorch_cuda.so`, or `libtorch_hip.so` for ROCm); without it
libtorch registers no CUDA device on any machine. And a machine whose OS shows GPUs that
libtorch cannot use (faked with a device directory holding `nvidia0`) must make `lathe doctor`
and `--device auto` fail loudly.
"""

import json
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import find_lathe_bin, to_toml, train_config, write_chat_dataset

BACKENDS = ("libtorch_cuda.so", "libtorch_hip.so")


def elf_dynamic(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, DT_RUNPATH/DT_RPATH directories) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit LE ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: the dynamic string table
    def string(offset: int) -> str:
        start = strtab[4] + offset
        return data[start:data.index(b"\0", start)].decode()
    needed, paths = [], []
    for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:
            break
        if tag == 1:
            needed.append(string(value))
        elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
            paths += string(value).split(":")
    return needed, paths


def linked_libtorch_dir(needed: list[str], paths: list[str]) -> Path:
    assert "libtorch_cpu.so" in needed, f"lathe does not link libtorch at all: {needed}"
    for directory in paths:
        if (Path(directory) / "libtorch_cpu.so").exists():
            return Path(directory)
    pytest.fail(f"libtorch_cpu.so is in none of the binary's run paths {paths}", pytrace=False)


def lathe(*args, env=None):
    return subprocess.run([str(find_lathe_bin()), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_the_binary_depends_on_the_gpu_backend_its_libtorch_ships():
    needed, paths = elf_dynamic(find_lathe_bin())
    libtorch = linked_libtorch_dir(needed, paths)
    shipped = [name for name in BACKENDS if (libtorch / name).exists()]
    for name in shipped:
        assert name in needed, (f"{libtorch} ships {name} but lathe does not depend on it (the linker dropped it; "
                                f"--device cuda would find no GPU). ELF NEEDED: {needed}")
    if not shipped:
        pytest.skip(f"{libtorch} is a CPU-only libtorch")


def test_a_running_lathe_initialises_the_gpu_backend():
    needed, paths = elf_dynamic(find_lathe_bin())
    libtorch = linked_libtorch_dir(needed, paths)
    shipped = [name for name in BACKENDS if (libtorch / name).exists()]
    if not shipped:
        pytest.skip(f"{libtorch} is a CPU-only libtorch")
    # The dynamic loader's own account: it runs each library's initialisers (where libtorch's
    # backend registers CUDA) and says so under LD_DEBUG.
    proc = lathe("doctor", env={"LD_DEBUG": "libs"})
    inits = [line for line in proc.stderr.splitlines() if "calling init:" in line]
    for name in shipped:
        assert any(line.rstrip().endswith("/" + name) for line in inits), (
            f"a running lathe never initialised {name}; initialised: {[l.split()[-1] for l in inits][-15:]}")
    report = json.loads(lathe("doctor", "--json").stdout)
    assert report["gpu_backend"] in shipped
    assert Path(report["gpu_backend_loaded_from"]).resolve() == (libtorch / report["gpu_backend"]).resolve()


def test_doctor_on_a_machine_without_gpus_reports_the_backend_and_zero_devices():
    proc = lathe("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["libtorch_version"].startswith("2."), report["libtorch_version"]
    assert Path(report["libtorch_dir"], "libtorch_cpu.so").exists()
    assert report["libtorch_gpus"] == 0 and report["os_gpus"] == []
    assert report["auto_device"] == {"Ok": "cpu"}
    text = lathe("doctor")
    assert text.returncode == 0
    assert "status           ok" in text.stdout
    if report["gpu_backend"]:
        assert "compiled in, loaded from" in text.stdout, text.stdout


@pytest.fixture
def fake_gpu_host(tmp_path):
    """A device directory holding `nvidia0`: a character device as on a real host when we are
    root (as in CI), else a plain file (the check looks at names only)."""
    dev = tmp_path / "dev"
    dev.mkdir()
    node = dev / "nvidia0"
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        node.touch()
    (dev / "nvidiactl").touch()  # present on GPU hosts; not a GPU
    env = {"LATHE_DEV_DIR": str(dev)}
    for hide in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        env[hide] = os.environ.get(hide, "0") or "0"  # a list of GPUs: nothing hidden on purpose
    return dev, env


def test_doctor_fails_when_the_os_shows_gpus_that_libtorch_cannot_use(fake_gpu_host):
    dev, env = fake_gpu_host
    proc = lathe("doctor", env=env)
    assert proc.returncode != 0, proc.stdout
    assert f"{dev}/nvidia0" in proc.stdout and "nvidiactl" not in proc.stdout.split("OS GPU devices")[1].split("\n")[0]
    assert "libtorch cannot use them" in proc.stderr, proc.stderr
    assert "PROBLEM" in proc.stdout


def test_hiding_every_gpu_on_purpose_lets_auto_choose_the_cpu(fake_gpu_host):
    dev, env = fake_gpu_host
    proc = lathe("doctor", "--json", env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["auto_device"] == {"Ok": "cpu"} and report["gpus_hidden_by"] == "CUDA_VISIBLE_DEVICES="


def test_device_auto_refuses_to_train_on_the_cpu_of_a_gpu_host(fake_gpu_host, tiny_model, tmp_path):
    dev, env = fake_gpu_host
    out = tmp_path / "run"
    config = train_config(tiny_model("qwen3"), write_chat_dataset(tmp_path / "train.jsonl"), out,
                          train={"device": "auto"}, debug={"dump_batches": False})
    (tmp_path / "run.toml").write_text(to_toml(config))
    proc = lathe("train", tmp_path / "run.toml", env=env)
    assert proc.returncode != 0, "lathe train --device auto trained on the CPU of a host with /dev/nvidia0"
    assert "auto: the OS shows GPUs" in proc.stderr and "nvidia0" in proc.stderr, proc.stderr
    assert "lathe doctor" in proc.stderr and "--device cpu" in proc.stderr
    assert not (out / "events.jsonl").exists(), "nothing may be written when the device is refused"
    # The same host, the same config, the CPU asked for explicitly: it trains.
    (tmp_path / "run.toml").write_text(to_toml({**config, "train": {**config["train"], "device": "cpu", "max_steps": 1}}))
    assert lathe("train", tmp_path / "run.toml", env=env).returncode == 0


def test_a_worker_on_a_gpu_host_whose_gpus_are_unusable_does_not_start(fake_gpu_host):
    dev, env = fake_gpu_host
    proc = lathe("worker", "--controller", "http://127.0.0.1:9", "--token", "x", env=env)
    assert proc.returncode != 0
    assert "the OS shows GPUs" in proc.stderr, proc.stderr


def test_gpu_check_runs_its_cpu_only_mode_and_says_what_it_would_check(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, LATHE_BIN=str(find_lathe_bin())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No GPU here. On a CUDA machine this script checks" in proc.stdout
    assert "logits vs transformers on CUDA" in proc.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {r["check"]: r for r in result["rows"]}
    assert checks["logits fp32 on cpu"]["verdict"] == "PASS"
    assert checks["lathe doctor"]["verdict"] == "PASS"
    assert any(c.startswith("throughput tiny") and "tokens/s" in r["result"] for c, r in checks.items())
    assert "tokens/s" in checks["throughput tiny QLoRA (CPU self-test) (fp32, cpu)"]["result"]
    assert "tokens/s" in checks["throughput tiny full (CPU self-test) (fp32, cpu)"]["result"]
    assert "QLoRA (nf4): 5 steps on CUDA vs the CPU" in proc.stdout
    assert checks["data parallel 2 ranks (gloo) vs 1 process, cpu"]["verdict"] == "PASS"
    assert "with 2+ GPUs: data parallel over every GPU on NCCL" in proc.stdout
    assert "CPU-only mode" in proc.stdout
