"""Shared helpers for the interop suite: Lathe's outputs checked against `transformers` + `peft`.

The suite drives the real `lathe` binary (env `LATHE_BIN`, else `target/release/lathe`, built by
`scripts/setup.sh`) and compares what it writes with the Hugging Face reference stack loaded
from the same files. Everything runs on CPU in float32 unless a test says otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(int(os.environ.get("LATHE_TEST_THREADS", "2")))

ROOT = Path(__file__).resolve().parents[2]
IGNORE_INDEX = -100
LORA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model; runs in CI too (deselect with -m 'not slow')")


# ---------------------------------------------------------------------------------------------
# the binary


def find_lathe_bin() -> Path:
    explicit = os.environ.get("LATHE_BIN")
    candidate = Path(explicit) if explicit else ROOT / "target" / "release" / "lathe"
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        pytest.fail(
            f"lathe binary not found at {candidate}: run scripts/setup.sh "
            "(cargo build --release -p lathe-cli) or set LATHE_BIN",
            pytrace=False,
        )
    return candidate


@pytest.fixture(scope="session")
def lathe_bin() -> Path:
    return find_lathe_bin()


def run_lathe(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `lathe ARGS...`; a non-zero exit fails the test with the tail of its output."""
    cmd = [str(find_lathe_bin()), *map(str, args)]
    env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited with {proc.returncode}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return proc


# ---------------------------------------------------------------------------------------------
# models


def init_model(out: Path, arch: str, preset: str = "tiny", seed: int = 0) -> Path:
    run_lathe("model", "init", "--arch", arch, "--preset", preset, "--seed", seed, "--out", out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), f"`lathe model init` did not write {name} in {out}"
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, lathe_bin):
    """`tiny_model(arch)` -> a directory made once per session by `lathe model init`."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = init_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, "tiny", seed=0)
        return made[arch]

    return get


def load_hf_model(model_dir: Path, dtype=torch.float32):
    """Loads with transformers and fails if any weight was missing or left unused: from_pretrained
    would otherwise fill a missing tensor with random values and the comparison would mean nothing."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not _is_tied_head(model, k)]
    assert not missing, f"transformers found no tensor for {missing} in {model_dir}"
    assert not info["unexpected_keys"], f"transformers ignored {info['unexpected_keys']} in {model_dir}"
    assert not info.get("mismatched_keys"), f"shape mismatch: {info['mismatched_keys']}"
    return model.eval()


def _is_tied_head(model, key: str) -> bool:
    return key == "lm_head.weight" and model.config.tie_word_embeddings


def load_peft_model(base_dir: Path, adapter_dir: Path, dtype=torch.float32, trainable: bool = False):
    from peft import PeftModel

    base = load_hf_model(base_dir, dtype)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    return model if trainable else model.eval()


def random_input_ids(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen, dtype=torch.int64)


def lathe_logits(workdir: Path, model_dir: Path, input_ids: torch.Tensor, adapter: Path | None = None,
                 dtype: str = "fp32") -> torch.Tensor:
    """`lathe model forward` on `input_ids`; returns float32 logits (B, T, V)."""
    workdir.mkdir(parents=True, exist_ok=True)
    inp, out = workdir / f"input-{dtype}.safetensors", workdir / f"logits-{dtype}.safetensors"
    save_file({"input_ids": input_ids.contiguous()}, str(inp))
    args = ["model", "forward", "--model", model_dir, "--input", inp, "--out", out, "--dtype", dtype]
    if adapter is not None:
        args += ["--adapter", adapter]
    run_lathe(*args)
    logits = load_file(str(out))["logits"]
    assert logits.dtype == torch.float32, f"logits must be float32, got {logits.dtype}"
    return logits


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: lathe logits contain NaN/inf"
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 1e-3, f"{what}: reference logits are all ~0 (max {scale}); the comparison would be empty"
    assert diff <= atol, f"{what}: max |lathe - reference| = {diff:.3e} > {atol:.0e} (logit scale {scale:.3e})"


# ---------------------------------------------------------------------------------------------
# data and training runs

CVE_EXAMPLES = [
    ("Cross-site scripting (XSS) in the search page of Acme CMS 2.1 allows remote attackers to inject "
     "arbitrary web script via the q parameter.", "CWE-79"),
    ("SQL injection in login.php of Foo Portal 1.0 allows remote attackers to execute arbitrary SQL "
     "commands via the username field.", "CWE-89"),
    ("Buffer overflow in the packet parser of Bar Router firmware 3.4 allows remote attackers to execute "
     "arbitrary code via a long hostname.", "CWE-119"),
    ("Path traversal in the download handler of Baz FileShare 5 allows reading arbitrary files via ../ "
     "sequences in the name parameter.", "CWE-22"),
    ("Stored XSS in the comment form of Qux Blog 0.9 lets authenticated users inject script into posts.",
     "CWE-79"),
    ("Improper authentication in the admin API of Widget Server 7 allows bypass via a crafted token.",
     "CWE-287"),
    ("Reflected cross-site scripting in the error page of Gizmo Wiki allows script injection via the "
     "title argument.", "CWE-79"),
    ("OS command injection in the ping utility of NetBox Lite allows attackers to run commands via the "
     "host field.", "CWE-78"),
    ("Use after free in the image decoder of View Pro 12 allows code execution via a crafted PNG file.",
     "CWE-416"),
    ("SQL injection in the report module of Ledger ERP allows data exfiltration via the sort parameter.",
     "CWE-89"),
    ("Cross-site request forgery in the settings page of Mailer 4 allows changing the admin password.",
     "CWE-352"),
    ("Out-of-bounds write in the font renderer of Doc Viewer 3 allows code execution via a crafted font.",
     "CWE-787"),
    ("XSS in the profile page of Social Hub allows injection of script through the display name.", "CWE-79"),
    ("Missing authorization in the export endpoint of Data Lake 2 lets any user download other tenants' "
     "data.", "CWE-862"),
    ("Integer overflow in the length field handling of Media Server leads to a heap buffer overflow.",
     "CWE-190"),
    ("Deserialization of untrusted data in the RPC layer of Queue Broker 8 allows remote code execution.",
     "CWE-502"),
]

SYSTEM_PROMPT = "You are a security analyst. Answer with the CWE id only."


def write_chat_dataset(path: Path, examples=CVE_EXAMPLES) -> Path:
    """OpenAI chat JSONL: CVE-like description -> CWE id. Every other row has a system message;
    every third answer carries a justification, so micro-batches differ in trained tokens."""
    with open(path, "w") as f:
        for i, (description, cwe) in enumerate(examples):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if i % 2 == 0 else []
            answer = cwe
            if i % 3 == 1:
                answer = (f"The description names the flaw and the attack vector; the weakness behind it "
                          f"is {cwe}, which matches the product behaviour described.\n\n{cwe}")
            messages += [
                {"role": "user", "content": f"Map this CVE description to a CWE: {description}"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def train_config(model_dir: Path, train_file: Path, output_dir: Path, **sections) -> dict:
    """A `lathe train` config with parity-friendly defaults; `sections` override keys per table,
    e.g. `optim={"weight_decay": 0.01}` or `method="full"`."""
    config = {
        "model": str(model_dir),
        "train_file": str(train_file),
        "output_dir": str(output_dir),
        "method": "lora",
        "seed": 0,
        "data": {"max_seq_length": 256, "packing": False, "train_on_inputs": False},
        "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False},
        "optim": {"learning_rate": 2e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                  "max_grad_norm": 1.0, "lr_scheduler": "cosine", "warmup_steps": 2},
        "train": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1, "dtype": "fp32",
                  "device": "cpu", "shuffle": True, "eval_every": 0, "checkpoint_every": 0,
                  "gradient_checkpointing": False},
        "debug": {"dump_batches": True},
        "output": {"merge": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def train(tmp_path: Path, model_dir: Path, name: str = "run", **sections) -> Path:
    """Writes the dataset and config under tmp_path, runs `lathe train`, returns the output dir."""
    train_file = write_chat_dataset(tmp_path / "train.jsonl")
    output_dir = tmp_path / name
    config = train_config(model_dir, train_file, output_dir, **sections)
    config_path = tmp_path / f"{name}.toml"
    config_path.write_text(to_toml(config))
    run_lathe("train", config_path)
    assert (output_dir / "events.jsonl").is_file(), "lathe train wrote no events.jsonl"
    return output_dir


def to_toml(config: dict) -> str:
    """Enough TOML for a training config: scalars, lists of scalars and one level of tables."""
    top = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in config.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"TOML config value {v} is not finite")
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def read_events(output_dir: Path) -> list[dict]:
    with open(output_dir / "events.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_events(output_dir: Path) -> list[dict]:
    """The `step` events in step order, checked to be 1, 2, ..., n."""
    steps = [e for e in read_events(output_dir) if e.get("type") == "step"]
    assert steps, f"no step events in {output_dir / 'events.jsonl'}"
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1)), "step events are not 1..n in order"
    return steps


def load_batches(output_dir: Path) -> dict[int, list[dict[str, torch.Tensor]]]:
    """debug/batches.safetensors -> {step: [micro0, micro1, ...]}, each {input_ids, targets, attention_mask}."""
    path = output_dir / "debug" / "batches.safetensors"
    assert path.is_file(), f"{path} missing: was [debug] dump_batches = true honoured?"
    tensors = load_file(str(path))
    steps: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        step_part, micro_part, field = key.split(".")
        assert step_part.startswith("step") and micro_part.startswith("micro"), f"unexpected key {key}"
        steps.setdefault(int(step_part[4:]), {}).setdefault(int(micro_part[5:]), {})[field] = tensor
    result = {}
    for step, micros in steps.items():
        assert sorted(micros) == list(range(len(micros))), f"step {step}: micro-batches {sorted(micros)}"
        result[step] = [micros[m] for m in range(len(micros))]
        for m, micro in enumerate(result[step]):
            assert set(micro) == {"input_ids", "targets", "attention_mask"}, f"step {step} micro {m}: {set(micro)}"
            shapes = {tuple(t.shape) for t in micro.values()}
            assert len(shapes) == 1, f"step {step} micro {m}: tensors disagree in shape {shapes}"
            assert all(t.dtype == torch.int64 for t in micro.values()), f"step {step} micro {m}: not int64"
    return result


def assert_targets_are_shifted_inputs(micro: dict[str, torch.Tensor], where: str):
    """targets[b, t] must be the next real token input_ids[b, t+1] wherever it carries loss."""
    ids, targets, mask = micro["input_ids"], micro["targets"], micro["attention_mask"]
    trained = targets != IGNORE_INDEX
    assert not trained[:, -1].any(), f"{where}: the last position has a target but no next token"
    next_ids = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    next_real = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1) == 1
    assert (trained <= next_real).all(), f"{where}: a target points at padding"
    assert (targets[trained] == next_ids[trained]).all(), f"{where}: targets are not input_ids shifted by one"
    assert (mask[trained] == 1).all(), f"{where}: loss on a padded position"
    # right padding only: a row's real tokens are a prefix
    assert (mask[:, 1:] <= mask[:, :-1]).all(), f"{where}: attention_mask is not right padding"


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


def reference_training(model, steps: list[dict], batches: dict, optim: dict) -> list[dict]:
    """Replays Lathe's optimizer steps with torch: same batches, same lr per step, AdamW, clipping.

    Weight decay as the HF Trainer applies it: every matrix, no biases and no norm weights (the
    1-D tensors; LoRA has none). Returns per step {"loss", "grad_norm"}: loss = sum of token
    cross-entropies over the step's micro-batches / the step's trained tokens (what Lathe reports)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the reference model has no trainable parameters"
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=steps[0]["lr"],
                                  betas=(optim["beta1"], optim["beta2"]), eps=optim["eps"], foreach=False)
    model.train()
    results = []
    for event in steps:
        micros = batches[event["step"]]
        for group in optimizer.param_groups:
            group["lr"] = event["lr"]
        trained_tokens = sum(int((m["targets"] != IGNORE_INDEX).sum()) for m in micros)
        assert trained_tokens > 0, f"step {event['step']} has no trained tokens"
        loss_sum = 0.0
        for micro in micros:
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            ce = token_cross_entropy_sum(logits, micro["targets"])
            (ce / trained_tokens).backward()
            loss_sum += ce.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, optim["max_grad_norm"]).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        results.append({"loss": loss_sum / trained_tokens, "grad_norm": grad_norm,
                        "trained_tokens": trained_tokens})
    return results


def assert_losses_match(steps: list[dict], reference: list[dict], rtol: float, grad_rtol: float):
    lines, worst = [], 0.0
    for event, ref in zip(steps, reference):
        rel = abs(event["loss"] - ref["loss"]) / abs(ref["loss"])
        worst = max(worst, rel)
        grad = ""
        if "grad_norm" in event:
            grad_rel = abs(event["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
            grad = f" grad_norm lathe {event['grad_norm']:.6g} torch {ref['grad_norm']:.6g} (rel {grad_rel:.1e})"
        lines.append(f"step {event['step']:3d}: loss lathe {event['loss']:.8f} torch {ref['loss']:.8f} "
                     f"(rel {rel:.1e}) lr {event['lr']:.3e}{grad}")
    table = "\n".join(lines)
    print(table)
    for event, ref in zip(steps, reference):
        rel = abs(event["loss"] - ref["loss"]) / abs(ref["loss"])
        assert rel <= rtol, f"step {event['step']}: loss differs by rel {rel:.2e} > {rtol:.0e}\n{table}"
        if "grad_norm" in event and event["grad_norm"] is not None:
            grad_rel = abs(event["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
            assert grad_rel <= grad_rtol, (
                f"step {event['step']}: grad_norm differs by rel {grad_rel:.2e} > {grad_rtol:.0e}\n{table}")
    quarter = max(1, len(steps) // 4)
    first = sum(e["loss"] for e in steps[:quarter]) / quarter
    last = sum(e["loss"] for e in steps[-quarter:]) / quarter
    assert last < first, f"the loss did not fall ({first:.4f} -> {last:.4f}), the comparison proves little\n{table}"


def copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sharpened_model(src: Path, dst: Path, target_logit_std: float = 0.7) -> Path:
    """A copy of `src` whose logits on random tokens have a standard deviation of at least
    `target_logit_std` (the final RMSNorm weight is scaled up if needed; never down).

    A model initialised with std 0.02 (transformers' default) predicts a near-uniform
    distribution, so every token costs about ln(V) and a loss normalised the wrong way (e.g. a
    mean of per-micro-batch means) equals the right one to 1e-4. With logits of std >= 0.7
    per-token losses differ and training moves, so such an error shows in the loss: measured with
    the reference loop over the 20-step LoRA run, a mean of means moves it by 1e-2 (std 0.7) to
    16% (Lathe's tiny preset, std ~1, left as is), while fp32 vs fp64 differ by 1e-7."""
    copy_model_dir(src, dst)
    model = load_hf_model(dst)
    std = hf_logits(model, random_input_ids(model.config.vocab_size, 2, 32, seed=3)).std().item()
    factor = max(1.0, target_logit_std / std)
    if factor > 1.0:
        tensors = load_file(str(dst / "model.safetensors"))
        assert "model.norm.weight" in tensors, f"no model.norm.weight in {src}"
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * factor
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
