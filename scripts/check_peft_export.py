#!/usr/bin/env python3
"""Checks that es2-wgpu's outputs load in transformers/PEFT with the same numbers.

    cargo run --release -- train --merge --out /tmp/es2-run
    cargo run --release -- export --out /tmp/tiny-chat-hf
    cargo run --release -- embed --chat --logits --json --lora /tmp/es2-run \\
        --prompt "How do I pick a lock?" > /tmp/es2-logits.json
    .venv/bin/python scripts/check_peft_export.py /tmp/tiny-chat-hf /tmp/es2-run /tmp/es2-logits.json

Loads the base folder, applies the adapter with PeftModel.from_pretrained, and compares the
last-position logits of the same chat prompt with es2-wgpu's; with a `merged/` folder in the
run, compares that too. Prints ||out-ref||/||ref||.
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "How do I pick a lock?"


def last_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0, -1]


def main(base_dir, run_dir, logits_file):
    ours = torch.tensor(json.loads(Path(logits_file).read_text())["logits"])
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, run_dir).eval()
    rel = lambda a, b: float((a - b).norm() / b.norm())
    print(f"PEFT adapter vs es2-wgpu: {rel(last_logits(peft, ids), ours):.3e}")
    merged = Path(run_dir) / "merged"
    if merged.exists():
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        print(f"merged folder vs es2-wgpu: {rel(last_logits(model, ids), ours):.3e}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
