"""Lathe's LoRA training steps are the steps torch + PEFT take from the same start on the same batches.

Lathe dumps its batches and its initial adapter ([debug] dump_batches); the reference loop loads
that adapter into PEFT, replays the batches with torch's AdamW at the lr Lathe reports for each
step, and must reproduce Lathe's loss at every step. Gradient accumulation over two micro-batches
of different lengths checks that the loss is normalised by the trained tokens of the whole step,
not averaged per micro-batch.
"""

import csv

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import (IGNORE_INDEX, assert_losses_match, assert_targets_are_shifted_inputs, load_batches,
                      load_peft_model, reference_training, sharpened_model, step_events, train)

STEPS = 20
OPTIM = {"learning_rate": 5e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "max_grad_norm": 1.0, "lr_scheduler": "cosine", "warmup_steps": 3}
LOSS_RTOL = 1e-3
GRAD_NORM_RTOL = 1e-2


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora-parity")
    model_dir = sharpened_model(tiny_model("qwen3"), tmp_path / "model")
    # 16 examples / (batch 2 x accumulation 2) = 4 steps per epoch; 5 epochs = 20 steps
    run = train(tmp_path, model_dir, optim=OPTIM,
                train={"epochs": 5, "max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 2,
                       "dtype": "fp32"},
                lora={"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"})
    return model_dir, run


def test_dumped_batches_hold_shifted_targets_on_assistant_tokens_only(lora_run):
    model_dir, run = lora_run
    batches = load_batches(run)
    assert sorted(batches) == list(range(1, STEPS + 1)), f"dumped steps {sorted(batches)}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for step, micros in batches.items():
        assert len(micros) == 2, f"step {step}: {len(micros)} micro-batches, expected 2 (accumulation)"
        for m, micro in enumerate(micros):
            assert micro["input_ids"].shape[0] == 2, f"step {step} micro {m}: batch {micro['input_ids'].shape[0]}"
            assert_targets_are_shifted_inputs(micro, f"step {step} micro {m}")
            for row in range(2):
                trained = micro["targets"][row][micro["targets"][row] != IGNORE_INDEX]
                text = tokenizer.decode(trained.tolist())
                assert "CWE-" in text, f"step {step} micro {m} row {row}: trained tokens {text!r} miss the answer"
                assert "Map this CVE" not in text, f"train_on_inputs=false but the prompt is trained: {text!r}"


@pytest.mark.slow
def test_lora_losses_match_torch_and_peft_step_by_step(lora_run):
    model_dir, run = lora_run
    steps = step_events(run)
    assert len(steps) == STEPS, f"{len(steps)} step events, expected {STEPS}"
    assert all(e["total_steps"] == STEPS for e in steps)
    lrs = [e["lr"] for e in steps]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs), f"no warmup + decay in the reported lr: {lrs}"
    assert max(lrs) <= OPTIM["learning_rate"] * (1 + 1e-9)

    model = load_peft_model(model_dir, run / "debug" / "initial_adapter", torch.float32, trainable=True)
    reference = reference_training(model, steps, load_batches(run), OPTIM)

    assert_losses_match(steps, reference, LOSS_RTOL, GRAD_NORM_RTOL)
    assert_final_adapter_matches(run / "adapter", model)
    for event, ref in zip(steps, reference):
        if "trained_tokens" in event:
            # per step or running total: either way it counts the same tokens as the batches
            cumulative = sum(r["trained_tokens"] for r in reference[: event["step"]])
            assert event["trained_tokens"] in (ref["trained_tokens"], cumulative), (
                f"step {event['step']}: trained_tokens {event['trained_tokens']}, batches hold "
                f"{ref['trained_tokens']} (running total {cumulative})")


def assert_final_adapter_matches(adapter_dir, trained_peft_model, atol: float = 1e-4):
    """The adapter Lathe saved after its last step holds the weights torch reached."""
    from peft import get_peft_model_state_dict

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    expected = {k: v.detach() for k, v in get_peft_model_state_dict(trained_peft_model).items()}
    assert set(saved) == set(expected), "final adapter keys differ from PEFT's"
    worst = max((saved[k] - expected[k]).abs().max().item() for k in expected)
    moved = max(v.abs().max().item() for k, v in expected.items() if ".lora_B." in k)
    print(f"final adapter: max |lathe - torch| = {worst:.2e} (largest lora_B entry {moved:.2e})")
    assert worst <= atol, f"final adapter differs from torch's by {worst:.2e} > {atol:.0e}"


def test_results_csv_reports_the_step_losses(lora_run):
    _, run = lora_run
    steps = step_events(run)
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "results.csv is empty"
    assert set(rows[0]) >= {"step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"}
    by_step = {int(r["step"]): r for r in rows if r["train_loss"]}
    assert set(by_step) == {e["step"] for e in steps}, f"results.csv steps {sorted(by_step)}"
    for event in steps:
        assert abs(float(by_step[event["step"]]["train_loss"]) - event["loss"]) <= 1e-4 * abs(event["loss"])
