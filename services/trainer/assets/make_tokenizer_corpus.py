#!/usr/bin/env python3
"""Builds tokenizer_corpus.jsonl, the text `lathe model init` trains its BPE tokenizer on.

Usage: python3 make_tokenizer_corpus.py [PATH/TO/cybersecqwen_rcm_2021_train.jsonl]

Deterministic (stdlib only, no randomness): the same input gives the same bytes. The corpus is
  - unique CVE descriptions from the Apache-2.0 CyberSecQwen rcm_2021 set (in file order),
  - every 8th of those rows also as the full prompt + response (so the instruction and the
    response templates are frequent enough to get their own merges),
  - a few lines of generic chat text written for this project (CHAT below).
It stops adding CVE rows once the corpus reaches TARGET_BYTES.
"""
import json
import os
import sys

TARGET_BYTES = 590_000
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "../../../../shared/datasets/cve-cwe/cybersecqwen_rcm_2021_train.jsonl")
MARKER = "CVE Description:"

CHAT = [
    "Hello! How can I help you today?",
    "Hi, I have a question about my code. It crashes when the input file is empty.",
    "Sure, please share the error message and the function that reads the file.",
    "Thanks for the explanation, that makes sense now.",
    "You're welcome! Let me know if you have any other questions.",
    "Can you summarize this paragraph in two sentences?",
    "Here is a short summary:\n\n1. The patch fixes a buffer overflow.\n2. Users should upgrade to the latest version.",
    "What is the difference between authentication and authorization?",
    "Authentication checks who you are; authorization checks what you are allowed to do.",
    "Please write a Python function that returns the sum of a list.",
    "```python\ndef total(values):\n    return sum(values)\n```",
    "I'm not sure I understand. Could you give me an example?",
    "Of course. For example, if a user sends a request with a forged token, the server should reject it.",
    "The answer is 42.",
    "Good morning! What would you like to work on today?",
    "Let's think step by step. First, we read the description. Then we pick the weakness that fits best.",
    "Is it safe to store passwords in plain text?",
    "No. Store a salted hash made with a slow function such as Argon2, bcrypt or scrypt.",
    "Translate \"thank you\" into French, Spanish and German.",
    "Merci, gracias and danke.",
    "{\"role\": \"assistant\", \"content\": \"The vulnerability is a cross-site scripting issue.\"}",
    "Explain what a SQL injection is to a beginner.",
    "A SQL injection happens when user input is pasted into a database query without escaping, so the input can change the query itself.",
    "What time zone is UTC+1? Central European Time, for example in Berlin or Paris.",
    "Can you list three ways to reduce memory usage?\n\n- Stream the data instead of loading it all.\n- Use smaller number types.\n- Free buffers you no longer need.",
    "Sorry, I can't help with that request.",
    "The meeting is on Tuesday at 10:30 am, in room 204.",
    "Please review my pull request when you have time.",
    "I updated the README and fixed the failing test.",
    "Why does my program print NaN after a few steps of training?",
    "The learning rate is probably too high; try lowering it or clipping the gradient norm.",
]


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SOURCE
    docs, seen, size = [], set(), 0
    for line in CHAT:
        docs.append(line)
    with open(source, encoding="utf-8") as f:
        for index, raw in enumerate(f):
            if size >= TARGET_BYTES:
                break
            row = json.loads(raw)
            prompt, response = row["prompt"], row["response"]
            description = prompt[prompt.index(MARKER) + len(MARKER):].strip()
            if description in seen:
                continue
            seen.add(description)
            text = prompt + "\n\n" + response if index % 8 == 0 else description
            docs.append(text)
            size += len(text.encode("utf-8"))
    out = os.path.join(HERE, "tokenizer_corpus.jsonl")
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    print(f"{out}: {len(docs)} documents, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
