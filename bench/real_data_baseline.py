"""The Python baselines of scripts/bench_real.sh: LoRA fine-tuning on a chat JSONL file as users
run it with TRL's SFTTrainer (packing, or padding each batch) or with a plain transformers + PEFT
loop that pads each batch to its longest row. One epoch, constant learning rate, AdamW, LoRA on
every linear layer, loss on every real token (TRL's default for "messages" data), the model's
chat template, the same numbers Lathe's TOML gets. Prints one JSON object: wall-clock of the
training loop (model loading excluded), trained tokens (labels that count), tokens/s, the loss
curve.

    python bench/real_data_baseline.py --mode trl-packing --model DIR --data train.jsonl ...
"""

import argparse
import json
import math
import sys
import time

import torch

IGNORE_INDEX = -100


def load_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def run_trl(args, dtype) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    dataset = Dataset.from_list(load_rows(args.data))
    packing = args.mode == "trl-packing"
    config = SFTConfig(
        output_dir=args.out,
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size if packing else args.rows_per_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        # TRL turns activation checkpointing on by default; Lathe's run keeps activations, so the
        # comparison is like for like in compute and in what memory holds.
        gradient_checkpointing=False,
        max_length=args.max_length,
        packing=packing,
        bf16=dtype == torch.bfloat16,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(args))
    # Count the labels that enter the loss (as Lathe's trained_tokens), batch by batch.
    counted = {"tokens": 0}
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        labels = batch["labels"]
        counted["tokens"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
        return batch

    trainer.data_collator = counting_collator
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "trained_tokens": counted["tokens"], "losses": losses,
            "steps": trainer.state.global_step}


def run_padding(args, dtype) -> dict:
    """transformers + PEFT with a hand-written loop: batches of rows in file order, padded to
    the longest row of the batch, the loss over real tokens (shifted)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, lora_config(args))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer.apply_chat_template(r["messages"], tokenize=True) for r in load_rows(args.data)]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    rows = [r[: args.max_length] for r in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    losses, trained = [], 0
    start = time.perf_counter()
    for i in range(0, len(rows), args.rows_per_batch):
        batch = rows[i:i + args.rows_per_batch]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        count = int((targets != IGNORE_INDEX).sum())
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum") / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        trained += count
        print(f"step {len(losses)} loss {losses[-1]:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "trained_tokens": trained, "losses": losses, "steps": len(losses)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=["trl-packing", "trl-padding", "hf-padding"])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--data", required=True, help="chat JSONL ({\"messages\": [...]} per line)")
    parser.add_argument("--out", required=True, help="scratch directory for the trainer")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--max-length", type=int, default=512, help="packed sequence length / row cut-off")
    parser.add_argument("--batch-size", type=int, default=4, help="packed sequences per step")
    parser.add_argument("--rows-per-batch", type=int, default=16, help="rows per step when padding")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result = run_padding(args, dtype) if args.mode == "hf-padding" else run_trl(args, dtype)
    assert all(math.isfinite(x) for x in result["losses"]), f"non-finite loss: {result['losses']}"
    result.update(impl=args.mode, dtype=args.dtype, threads=torch.get_num_threads(),
                  tokens_per_second=result["trained_tokens"] / result["seconds"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
