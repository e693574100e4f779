"""Full fine-tuning: Lathe's steps are the steps torch's AdamW takes on every parameter of the
transformers model, from the same weights on the same batches, and `output_dir/model` holds the
weights torch reached.

Convention checked here (the HF Trainer's): weight decay on every matrix, including the
embeddings (tied ones counted once), none on biases and norm weights. Applying it to the norms too
moves the loss by ~1e-5 after one step: the final-model check below (1e-4 on logits of scale ~10)
tells the two apart, the 1e-3 loss tolerance alone would not.
"""

import pytest
import torch

from conftest import (assert_logits_close, assert_losses_match, hf_logits, load_batches, load_hf_model,
                      random_input_ids, reference_training, sharpened_model, step_events, train)

STEPS = 5
OPTIM = {"learning_rate": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "max_grad_norm": 1.0, "lr_scheduler": "cosine", "warmup_steps": 1}


@pytest.mark.slow
def test_full_finetune_losses_match_torch_step_by_step(tiny_model, tmp_path):
    model_dir = sharpened_model(tiny_model("qwen3"), tmp_path / "model")
    run = train(tmp_path, model_dir, method="full", optim=OPTIM,
                train={"epochs": 2, "max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 2,
                       "dtype": "fp32"})
    steps = step_events(run)
    assert len(steps) == STEPS, f"{len(steps)} step events, expected {STEPS}"

    model = load_hf_model(model_dir, torch.float32)
    for param in model.parameters():
        param.requires_grad_(True)
    reference = reference_training(model, steps, load_batches(run), OPTIM)

    assert_losses_match(steps, reference, rtol=1e-3, grad_rtol=1e-2)

    # the model Lathe wrote after its last step is the model torch reached
    saved = load_hf_model(run / "model", torch.float32)
    input_ids = random_input_ids(saved.config.vocab_size, batch=2, seq=24, seed=11)
    model.eval()
    assert_logits_close(hf_logits(saved, input_ids), hf_logits(model, input_ids), 1e-4, "output_dir/model vs torch")
