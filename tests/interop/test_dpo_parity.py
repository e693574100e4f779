"""Lathe's DPO steps are the steps TRL's DPOTrainer takes from the same start on the same pairs.

Lathe trains a preference file in OpenAI's DPO format (`[dpo]`, shuffle off) and dumps its batches
and, for LoRA, its initial adapter. TRL's DPOTrainer then trains the same weights (PEFT with that
adapter, or the whole transformers model) on the same pairs, token for token: each pair's prompt
and two answers are read back from Lathe's batches, so the comparison is of the optimisation, not
of two tokenizers. Per step, fp32: the loss and the answers' log-probabilities agree within 1e-5
(relative), the rewards within 1e-5 of β·|log p| (what fp32 resolves of a difference of two sums
of ~80 nats), the reward accuracy exactly; step 1's loss is ln 2 (policy = reference).
"""

import json
import math

import pytest
import torch

from conftest import (CVE_EXAMPLES, IGNORE_INDEX, load_batches, load_hf_model, load_peft_model, run_lathe,
                      sharpened_model, step_events, to_toml, train_config)

trl = pytest.importorskip("trl", reason="TRL is installed by scripts/test.sh (scripts/requirements-test.txt)")

STEPS = 12
BETA = 0.1
RTOL = 1e-5
OPTIM = {"learning_rate": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "max_grad_norm": 1.0, "lr_scheduler": "constant", "warmup_steps": 0}


def write_preference_dataset(path):
    """OpenAI's DPO format: the right CWE preferred over another example's CWE."""
    with open(path, "w") as f:
        for i, (description, cwe) in enumerate(CVE_EXAMPLES):
            wrong = next(c for _, c in CVE_EXAMPLES[i + 1:] + CVE_EXAMPLES[:i] if c != cwe)
            preferred = cwe if i % 3 else f"The flaw described is {cwe}."
            f.write(json.dumps({
                "input": {"messages": [{"role": "user", "content": f"Map this CVE description to a CWE: {description}"}]},
                "preferred_output": [{"role": "assistant", "content": preferred}],
                "non_preferred_output": [{"role": "assistant", "content": wrong}],
            }) + "\n")
    return path


def train_dpo(tmp_path, model_dir, method):
    train_file = write_preference_dataset(tmp_path / "pairs.jsonl")
    out = tmp_path / f"dpo-{method}"
    config = train_config(model_dir, train_file, out, method=method, optim=OPTIM, dpo={"beta": BETA},
                          train={"epochs": 2, "max_steps": STEPS, "batch_size": 2, "shuffle": False, "dtype": "fp32"})
    (tmp_path / f"dpo-{method}.toml").write_text(to_toml(config))
    run_lathe("train", tmp_path / f"dpo-{method}.toml")
    return out


def pairs_from_batches(run):
    """Each step's pairs as TRL's tokenized rows: the prompt, then each answer's trained tokens."""
    rows = []
    for step, micros in sorted(load_batches(run).items()):
        for micro in micros:
            n = micro["input_ids"].shape[0] // 2
            sides = []
            for r in range(2 * n):
                targets = micro["targets"][r]
                trained = (targets != IGNORE_INDEX).nonzero().flatten()
                first, last = trained[0].item(), trained[-1].item()
                assert (targets[first:last + 1] != IGNORE_INDEX).all(), f"step {step}: an answer's tokens are not contiguous"
                sides.append((micro["input_ids"][r][:first + 1].tolist(), targets[first:last + 1].tolist()))
            for i in range(n):
                (prompt, chosen), (prompt_rejected, rejected) = sides[i], sides[n + i]
                assert prompt == prompt_rejected, f"step {step}: the two answers of pair {i} follow different prompts"
                rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def trl_steps(model, model_dir, rows, tmp_path):
    """TRL's DPOTrainer on `rows` in order; per step its loss and logged DPO metrics."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    recorded = []

    class InOrder(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized, by Lathe

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            metrics = {k: v[-1] for k, v in self._metrics["train"].items() if isinstance(v, list) and v}
            recorded.append({"loss": loss.item(), **metrics})
            return loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=OPTIM["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, max_steps=STEPS,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=BETA, loss_type=["sigmoid"], max_length=None, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, seed=0, remove_unused_columns=False, dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return recorded


def assert_steps_match(lathe, reference):
    assert len(reference) == len(lathe) == STEPS, f"{len(lathe)} Lathe steps, {len(reference)} TRL steps"
    assert math.isclose(lathe[0]["loss"], math.log(2), rel_tol=1e-6), f"step 1 loss {lathe[0]['loss']} != ln 2"
    for event, ref in zip(lathe, reference):
        p = event["preference"]
        # A reward is β times a difference of two summed log-probabilities (~50-90 nats here): it
        # is as exact as β·|log p| allows in fp32, so it is compared on that scale.
        reward_scale = BETA * max(abs(ref["logps/chosen"]), abs(ref["logps/rejected"]))
        for name, ours, theirs, scale in [
            ("loss", event["loss"], ref["loss"], abs(ref["loss"])),
            ("logps/chosen", p["logps_chosen"], ref["logps/chosen"], abs(ref["logps/chosen"])),
            ("logps/rejected", p["logps_rejected"], ref["logps/rejected"], abs(ref["logps/rejected"])),
            ("rewards/chosen", p["rewards_chosen"], ref["rewards/chosen"], reward_scale),
            ("rewards/rejected", p["rewards_rejected"], ref["rewards/rejected"], reward_scale),
            ("rewards/margins", p["rewards_margin"], ref["rewards/margins"], reward_scale),
            ("rewards/accuracies", p["rewards_accuracy"], ref["rewards/accuracies"], 1.0),
        ]:
            assert abs(ours - theirs) <= RTOL * scale, (
                f"step {event['step']} {name}: Lathe {ours:.9g}, TRL {theirs:.9g} "
                f"(difference {abs(ours - theirs):.2e}, allowed {RTOL * scale:.2e})")
    assert lathe[-1]["loss"] < lathe[0]["loss"], "the DPO loss did not fall"


@pytest.mark.slow
def test_lora_dpo_matches_trl_step_by_step(tiny_model, tmp_path):
    model_dir = sharpened_model(tiny_model("qwen3"), tmp_path / "model")
    run = train_dpo(tmp_path, model_dir, "lora")
    model = load_peft_model(model_dir, run / "debug" / "initial_adapter", torch.float32, trainable=True)
    assert_steps_match(step_events(run), trl_steps(model, model_dir, pairs_from_batches(run), tmp_path))


@pytest.mark.slow
def test_full_parameter_dpo_matches_trl_step_by_step(tiny_model, tmp_path):
    model_dir = sharpened_model(tiny_model("qwen3"), tmp_path / "model")
    run = train_dpo(tmp_path, model_dir, "full")
    model = load_hf_model(model_dir, torch.float32).train()
    for param in model.parameters():
        param.requires_grad_(True)
    assert_steps_match(step_events(run), trl_steps(model, model_dir, pairs_from_batches(run), tmp_path))
