"""Benchmark data: `{"text": ...}` JSONL rows that each tokenise to just under the sequence length.

With packing off, every row is then one full-length sequence for Lathe (a few tokens of right
padding at most, for the special tokens Lathe adds), and no row is truncated or split. The text
is deterministic pseudo-prose (seeded word draws), tokenised with the model's own tokenizer.json.
Also writes `tokens.safetensors` (input_ids, rows x seq_len: each row's tokens, repeated to fill) for
`bench/hf_baseline.py --tokens` when no Lathe batch dump is at hand.

    python bench/make_data.py --model DIR --rows 48 --seq-len 512 --out DIR
"""

import argparse
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

WORDS = (
    "the a an of to in and or for with on by from that this which allows remote attackers local users "
    "execute arbitrary code cause denial service via crafted request parameter file path buffer overflow "
    "heap stack memory corruption cross site scripting injection sql command authentication bypass "
    "privilege escalation information disclosure sensitive data kernel driver firmware router server "
    "client browser plugin module library version before after through earlier later component function "
    "handler parser input validation improper neutralization sequence length integer underflow race "
    "condition use after free null pointer dereference out bounds read write certificate token session "
    "cookie header password credential key encryption weak random default configuration access control"
).split()


def make_row(tokenizer: Tokenizer, rng: random.Random, target_tokens: int) -> tuple[str, list[int]]:
    words: list[str] = []
    while True:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
        candidate = words + [sentence[0].upper() + sentence[1:] + "."]
        ids = tokenizer.encode(" ".join(candidate), add_special_tokens=False).ids
        if len(ids) > target_tokens:
            break
        words = candidate
    # fill the last few tokens word by word
    for word in rng.sample(WORDS, len(WORDS)):
        ids = tokenizer.encode(" ".join(words + [word]), add_special_tokens=False).ids
        if len(ids) <= target_tokens:
            words.append(word)
    text = " ".join(words)
    return text, tokenizer.encode(text, add_special_tokens=False).ids


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reserve", type=int, default=2, help="tokens left for BOS/EOS Lathe may add")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, lengths = [], []
    with open(out / "train.jsonl", "w") as f:
        for _ in range(args.rows):
            text, ids = make_row(tokenizer, rng, args.seq_len - args.reserve)
            f.write(json.dumps({"text": text}) + "\n")
            lengths.append(len(ids))
            rows.append((ids * (args.seq_len // max(1, len(ids)) + 1))[: args.seq_len])
    save_file({"input_ids": torch.tensor(rows, dtype=torch.int64)}, str(out / "tokens.safetensors"))
    print(json.dumps({"rows": args.rows, "min_tokens": min(lengths), "max_tokens": max(lengths),
                      "jsonl": str(out / "train.jsonl")}))


if __name__ == "__main__":
    main()
