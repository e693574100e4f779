"""What a person with a CUDA GPU runs to check Lathe on it (through scripts/gpu_check.sh).

On a GPU (libtorch in `lathe` and torch in this venv both see one):
  1. `lathe doctor`: the GPU backend is loaded, the driver's devices, NCCL.
  2. Logits parity against transformers on CUDA, fp32 and bf16, on the small preset.
  3. A LoRA run of a few steps on CUDA against the same run on the CPU: the losses agree.
  4. Throughput of the small preset (LoRA r16, seq 512, batch 4, bf16): tokens/s and peak device
     memory as the CUDA caching allocator counts it (Lathe's events), beside transformers + PEFT
     on the same GPU (torch.cuda.max_memory_allocated).
  5. A Qwen3-4B-shaped model (random weights, real shapes) when the GPU has >= 20 GiB: LoRA r64,
     bf16, gradient checkpointing, seq 1024: tokens/s and peak device memory.
Everything is printed as one table (and written to OUT/gpu_check.json).

Without a GPU it says so, lists what it would check, and runs the same harness on the CPU with
the tiny preset (parity fp32 and bf16, a short LoRA run, throughput), so the script itself is
tested on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from conftest import train_config, to_toml, write_chat_dataset  # noqa: E402

LATHE = Path(os.environ.get("LATHE_BIN", ROOT / "target" / "release" / "lathe"))
ROWS: list[dict] = []


def row(check: str, result: str, verdict: str):
    ROWS.append({"check": check, "result": result, "verdict": verdict})
    print(f"  {verdict:<5} {check}: {result}", flush=True)


def lathe(*args, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(LATHE), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    if check and proc.returncode != 0:
        raise RuntimeError(f"lathe {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def doctor() -> dict:
    proc = lathe("doctor", "--json", check=False)
    report = json.loads(proc.stdout)
    report["exit_code"] = proc.returncode
    return report


def logits_parity(model_dir: Path, work: Path, device: str, dtype: str):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (2, 128), generator=gen)
    inp, out = work / f"ids-{device}-{dtype}.safetensors", work / f"logits-{device}-{dtype}.safetensors"
    save_file({"input_ids": ids}, str(inp))
    lathe("model", "forward", "--model", model_dir, "--input", inp, "--out", out, "--dtype", dtype, "--device", device)
    ours = load_file(str(out))["logits"].float()
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        exact = reference(input_ids=ids.to(device)).logits.float().cpu()
        hf = reference.to(torch_dtype)(input_ids=ids.to(device)).logits.float().cpu()
    scale = exact.abs().max().item()
    lathe_err = (ours - exact).abs().max().item()
    hf_err = (hf - exact).abs().max().item()
    if dtype == "fp32":
        ok = lathe_err <= 1e-3
        row(f"logits fp32 on {device}", f"max abs(lathe - transformers) {lathe_err:.2e} (bound 1e-3, scale {scale:.1f})",
            "PASS" if ok else "FAIL")
    else:
        bound = 4 * hf_err + 1e-2 * scale
        row(f"logits bf16 on {device}",
            f"lathe bf16 error {lathe_err:.2e}, transformers bf16 error {hf_err:.2e} (bound {bound:.2e})",
            "PASS" if lathe_err <= bound else "FAIL")


def lora_run(model_dir: Path, work: Path, name: str, device: str, dtype: str, steps: int, nproc: int = 1,
             **overrides) -> list[dict]:
    out = work / name
    data = write_chat_dataset(work / "train.jsonl")
    train = {"device": device, "dtype": dtype, "epochs": 50, "max_steps": steps,
             "batch_size": overrides.pop("batch_size", 2), **overrides.pop("train", {})}
    config = train_config(model_dir, data, out, train=train, debug={"dump_batches": False}, **overrides)
    path = work / f"{name}.toml"
    path.write_text(to_toml(config))
    lathe("train", path, "--nproc", str(nproc))
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("type") == "step"]


def loss_agreement(model_dir: Path, work: Path, device: str):
    steps = 5
    cpu = lora_run(model_dir, work, "lora-cpu", "cpu", "fp32", steps)
    dev = lora_run(model_dir, work, f"lora-{device.replace(':', '')}", device, "fp32", steps)
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(dev, cpu))
    ok = len(dev) == len(cpu) == steps and worst <= 1e-3
    row(f"LoRA losses, {device} vs cpu (fp32, {steps} steps)", f"worst relative difference {worst:.2e} (bound 1e-3)",
        "PASS" if ok else "FAIL")


def qlora_agreement(model_dir: Path, work: Path, device: str):
    """QLoRA on the GPU dequantizes with tensor ops, on the CPU with cpp/nf4.cpp's loop: the same
    NF4 weights either way (docs/qlora.md), so the losses must agree as LoRA's do."""
    steps = 5
    cpu = lora_run(model_dir, work, "qlora-cpu", "cpu", "fp32", steps, quantization="nf4")
    dev = lora_run(model_dir, work, f"qlora-{device.replace(':', '')}", device, "fp32", steps, quantization="nf4")
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(dev, cpu))
    ok = len(dev) == len(cpu) == steps and worst <= 1e-3
    row(f"QLoRA (nf4) losses, {device} vs cpu (fp32, {steps} steps)",
        f"worst relative difference {worst:.2e} (bound 1e-3)", "PASS" if ok else "FAIL")


def data_parallel(model_dir: Path, work: Path, device: str, ranks: int):
    """`lathe train --nproc N` (NCCL on GPUs when built with it, Gloo on the CPU) against one
    process with N times the batch: same rows per step, so the losses must agree."""
    steps, per_rank = 6, 2
    one = lora_run(model_dir, work, "dp-one", device, "fp32", steps, batch_size=per_rank * ranks)
    many = lora_run(model_dir, work, "dp-ranks", device, "fp32", steps, nproc=ranks, batch_size=per_rank)
    first = (work / "dp-ranks" / "events.jsonl").read_text().splitlines()[0]
    started = json.loads(first)
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(many, one))
    # CPU fp32 agrees to summation order (~1e-7); GPU kernels differ a little more per batch shape.
    bound = 1e-6 if device == "cpu" else 1e-4
    ok = len(many) == len(one) == steps and started["ranks"] == ranks and worst <= bound
    row(f"data parallel {ranks} ranks ({started['dist_backend']}) vs 1 process, {device}",
        f"worst relative loss difference {worst:.2e} (bound {bound:.0e})", "PASS" if ok else "FAIL")
    reduce = statistics.median(e["all_reduce_seconds"] for e in many[1:])
    step = statistics.median(max(e["rank_step_seconds"]) + e["all_reduce_seconds"] for e in many[1:])
    row(f"data parallel {ranks} ranks: throughput", f"{statistics.median(e['tokens_per_second'] for e in many[1:]):,.0f} tokens/s "
        f"summed over ranks; all-reduce {reduce * 1e3:.1f} ms = {reduce / step:.0%} of a step", "INFO")
    if device != "cpu" and started["dist_backend"] != "nccl":
        row("NCCL", f"GPU ranks ran on {started['dist_backend']}: this lathe was built without NCCL headers "
            "(services/torch-ext/build.rs)", "FAIL")


def throughput(model_dir: Path, work: Path, device: str, dtype: str, label: str, steps: int, **overrides):
    events = lora_run(model_dir, work, f"speed-{label}", device, dtype, steps, **overrides)
    rates = [e["tokens_per_second"] for e in events[1:]] or [events[0]["tokens_per_second"]]
    peak = max(e["peak_memory_bytes"] for e in events)
    kind = "device (CUDA caching allocator)" if device != "cpu" else "host RSS"
    row(f"throughput {label} ({dtype}, {device})",
        f"{statistics.median(rates):,.0f} tokens/s, peak {kind} {peak / 2**30:.2f} GiB", "INFO")
    return statistics.median(rates), peak


def hf_throughput(model_dir: Path, device: str, seq: int, batch: int, steps: int, rank: int):
    """transformers + PEFT on the same shapes, for a side-by-side ratio on this GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    rates = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad()
        torch.cuda.synchronize()
        if i > 0:
            rates.append(batch * seq / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated()
    row(f"throughput small, transformers + PEFT (bf16, {device})",
        f"{statistics.median(rates):,.0f} tokens/s, peak device {peak / 2**30:.2f} GiB", "INFO")
    del model, optim
    torch.cuda.empty_cache()
    return statistics.median(rates), peak


def make_4b_shape(out: Path, tokenizer_from: Path) -> Path:
    """Qwen3-4B's shapes with random weights (nothing can be downloaded), in HF layout."""
    import shutil

    from transformers import Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, out / name)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--skip-4b", action="store_true", help="skip the Qwen3-4B-shaped run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not LATHE.is_file():
        sys.exit(f"gpu_check: no lathe binary at {LATHE} (run scripts/setup.sh or set LATHE_BIN)")

    print("==> lathe doctor")
    report = doctor()
    print(lathe("doctor", check=False).stdout)
    gpus = report["libtorch_gpus"]
    on_gpu = gpus > 0 and torch.cuda.is_available()
    if report["exit_code"] != 0:
        row("lathe doctor", report.get("auto_device", {}).get("Err", "exit code non-zero"), "FAIL")
    else:
        row("lathe doctor", f"GPU backend {report['gpu_backend'] or 'none'}, loaded: "
            f"{'yes' if report['gpu_backend_loaded_from'] else 'no'}, libtorch GPUs {gpus}", "PASS")

    if not on_gpu:
        print("\nNo GPU here. On a CUDA machine this script checks:\n"
              "  - lathe doctor: GPU backend loaded, devices, driver, NCCL\n"
              "  - logits vs transformers on CUDA, fp32 (<= 1e-3) and bf16 (<= 4x transformers' bf16 error)\n"
              "  - a 5-step LoRA run on CUDA vs the CPU (relative loss difference <= 1e-3)\n"
              "  - small preset LoRA r16 seq 512 batch 4 bf16: tokens/s, peak device memory, vs transformers+PEFT\n"
              "  - QLoRA (nf4): 5 steps on CUDA vs the CPU (<= 1e-3); tokens/s and peak device memory vs LoRA;\n"
              "    full fine-tuning tokens/s and peak device memory\n"
              "  - a Qwen3-4B-shaped model, LoRA r64 bf16 with gradient checkpointing, if the GPU has >= 20 GiB\n"
              "  - with 2+ GPUs: data parallel over every GPU on NCCL vs one GPU with the whole batch (<= 1e-4)\n"
              "Running the same harness on the CPU with the tiny preset instead (a self-test of this script).\n")
        device, preset = "cpu", "tiny"
    else:
        device, preset = args.device, "small"

    model_dir = args.out / f"model-qwen3-{preset}"
    if not (model_dir / "config.json").exists():
        lathe("model", "init", "--arch", "qwen3", "--preset", preset, "--seed", "0", "--out", model_dir)
    logits_parity(model_dir, args.out, device, "fp32")
    logits_parity(model_dir, args.out, device, "bf16" if on_gpu or report["cpu_native_bf16"] else "fp32")
    if on_gpu:
        loss_agreement(model_dir, args.out, device)
        seq = {"data": {"max_seq_length": 512, "packing": True}, "lora": {"rank": 16, "alpha": 32.0}}
        ours, our_peak = throughput(model_dir, args.out, device, "bf16", "small", 10, batch_size=4, **seq)
        theirs, their_peak = hf_throughput(model_dir, device, 512, 4, 10, 16)
        row("Lathe / transformers+PEFT", f"{ours / theirs:.2f}x tokens/s at {our_peak / their_peak:.2f}x peak memory",
            "INFO")
        qlora_agreement(model_dir, args.out, device)
        q_rate, q_peak = throughput(model_dir, args.out, device, "bf16", "small QLoRA (nf4)", 10, batch_size=4,
                                    quantization="nf4", **seq)
        row("QLoRA / LoRA (small, bf16)", f"{q_rate / ours:.2f}x tokens/s at {q_peak / our_peak:.2f}x peak device memory",
            "INFO")
        throughput(model_dir, args.out, device, "bf16", "small full fine-tune", 10, batch_size=4, method="full",
                   data=seq["data"])
        total = torch.cuda.get_device_properties(device).total_memory
        if args.skip_4b or total < 20 * 2**30:
            row("Qwen3-4B shape", f"skipped ({total / 2**30:.0f} GiB on the GPU, needs 20)", "SKIP")
        else:
            big = make_4b_shape(args.out / "model-qwen3-4b-shape", model_dir)
            throughput(big, args.out, device, "bf16", "4B shape", 4, batch_size=1,
                       data={"max_seq_length": 1024, "packing": True}, lora={"rank": 64, "alpha": 128.0},
                       train={"gradient_checkpointing": True})
        if gpus >= 2:
            data_parallel(model_dir, args.out, device, gpus)
        else:
            row("data parallel (NCCL)", f"skipped: {gpus} GPU; needs 2", "SKIP")
    else:
        throughput(model_dir, args.out, "cpu", "fp32", "tiny (CPU self-test)", 4)
        throughput(model_dir, args.out, "cpu", "fp32", "tiny QLoRA (CPU self-test)", 4, quantization="nf4")
        throughput(model_dir, args.out, "cpu", "fp32", "tiny full (CPU self-test)", 4, method="full")
        data_parallel(model_dir, args.out, "cpu", 2)

    (args.out / "gpu_check.json").write_text(json.dumps({"device": device, "doctor": report, "rows": ROWS}, indent=2))
    print("\n| verdict | check | result |\n|---|---|---|")
    for r in ROWS:
        print(f"| {r['verdict']} | {r['check']} | {r['result']} |")
    failed = [r for r in ROWS if r["verdict"] == "FAIL"]
    if failed:
        sys.exit(f"gpu_check: {len(failed)} check(s) failed")
    print(f"\ngpu_check: {'GPU checks passed' if on_gpu else 'CPU-only mode: harness self-test passed; no GPU was checked'}")


if __name__ == "__main__":
    main()
