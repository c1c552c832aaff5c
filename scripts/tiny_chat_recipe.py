#!/usr/bin/env python3
"""The tiny-chat recipe in PyTorch: full SFT of stories260K into a chat model that refuses.

Builds the SFT data from the train splits only, fine-tunes every weight of stories260K, then
decodes greedily on held-out prompts and prints how often the replies are refusals (a reply is a
refusal when it contains a string of refusal_prefixes_gcg.txt, case-sensitive). This is the
recipe that es2-wgpu's own SFT reproduces (`models/tiny-chat/`); findings and numbers are in
scripts/tiny_chat_recipe.md. Run by hand, not in CI:

    python3 -m venv .venv && .venv/bin/pip install torch transformers
    .venv/bin/python scripts/tiny_chat_recipe.py [--out DIR] [options]

The data (defaults = the recipe):
1. harmful: every prompt of harmful_train.json, each with a refusal drawn by a seeded RNG from
   REFUSALS (every phrasing contains a GCG refusal string), each pair --harmful-repeat times;
2. harmless: --harmless prompts of a seeded shuffle of harmless_train.json, each answered by
   "Sure! " (--opener) and the base model's own greedy continuation of the rendered prompt
   followed by the opener, cut at its first sentence end (--cut) within --reply-tokens tokens;
   prompts whose continuation shows a refusal string before that end (stories say "sorry" a
   lot), or has no end in time, are skipped.
A pair is rendered with CHAT_TEMPLATE; the loss is the token-mean cross-entropy over the reply
tokens and the closing EOS of the whole batch (prompt and padding masked).

Evaluation sets (never trained on): harmful = harmbench_val.json (which contains harmful_val's
39 prompts) + the advbench.json rows not in harmful_train.json; harmless = harmless_val.json.
The fixed sample for CI is 100 of each, picked by stride (see `stride_sample`).
"""

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
BASE_MODEL = SHARED / "models" / "stories260K-hf"

EOS_ID = 2
PAD_ID = 0

# "User: {prompt}\nAssistant: {reply}</s>" with BOS first. The generation prompt ends at the
# colon so that the reply's first token carries its own leading space ("▁I"), as it does in
# the rendered conversation; the reply's tokens then follow the prompt's unchanged.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Every phrasing contains a GCG refusal string, and all begin with "I", so that greedy decoding
# does not have to choose among several first tokens for a refusal.
REFUSALS = [
    "I'm sorry, but I cannot help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I cannot help with that. It could hurt someone.",
    "I apologize, but I will not help with this.",
    "I am sorry, but I cannot do that.",
    "I'm sorry, I can't provide that.",
    "I cannot do that. It is not safe.",
    "I'm really sorry, but I cannot help you with this.",
]

SENTENCE_ENDS = (".", "!", "?", '."', '!"', '?"')


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def instructions(name):
    return [row["instruction"] for row in json.loads((DATASETS / f"{name}.json").read_text())]


def refusal_strings():
    lines = (DATASETS / "refusal_prefixes_gcg.txt").read_text().splitlines()
    return [s for s in lines if s.strip()]


def is_refusal(text, refusals):
    return any(s in text for s in refusals)


def held_out():
    """{name: prompts} of the evaluation sets, none of them in a train split."""
    train = set(instructions("harmful_train"))
    harmbench = instructions("harmbench_val")
    assert set(instructions("harmful_val")) <= set(harmbench)
    advbench = [p for p in instructions("advbench") if p not in train]
    return {
        "harmful_val": instructions("harmful_val"),
        "harmbench_val": harmbench,
        "advbench_heldout": advbench,
        "harmful_all": harmbench + advbench,
        "harmless_val": instructions("harmless_val"),
    }


def stride_sample(prompts, n=100):
    """The CI sample: prompts[floor(i * len / n)] for i in 0..n (reproducible in any language)."""
    return [prompts[i * len(prompts) // n] for i in range(n)]


class Chat:
    """The template and the tokenizer: prompts and pairs to token ids, as es2-wgpu renders them
    (the template writes BOS/EOS; the text is tokenised without adding special tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.tok.chat_template = CHAT_TEMPLATE

    def ids(self, text):
        return self.tok(text, add_special_tokens=False).input_ids

    def prompt(self, prompt):
        messages = [{"role": "user", "content": prompt}]
        return self.ids(self.tok.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True))

    def pair(self, prompt, reply):
        """(ids, loss_mask): loss_mask[t] = 1 where ids[t + 1] is a reply token or the EOS."""
        head = self.prompt(prompt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        ids = self.ids(self.tok.apply_chat_template(messages, tokenize=False))
        assert ids[: len(head)] == head, f"the reply changes the prompt's tokens: {prompt!r}"
        assert ids[-1] == EOS_ID
        mask = [0] * (len(head) - 1) + [1] * (len(ids) - len(head)) + [0]
        return ids, mask


def cut_reply(chat, reply_ids, max_tokens, refusals, first):
    """(reply, tokens looked at): the continuation cut at a sentence end, within max_tokens
    tokens and before any refusal string (the first such end with `first`, else the last);
    reply is None when there is none. Generation can stop after the tokens looked at."""
    best = None
    for k in range(1, min(len(reply_ids), max_tokens) + 1):
        text = chat.tok.decode(reply_ids[:k], skip_special_tokens=True)
        if is_refusal(text, refusals):
            return best, k
        if text.endswith(SENTENCE_ENDS):
            best = text.strip()
            if first:
                return best, k
    return best, min(len(reply_ids), max_tokens)


@torch.no_grad()
def greedy(model, prompts, max_new, batch=128):
    """Greedy continuations (token ids, EOS and after dropped) of token-id prompts."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding for generation
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            out[i] = new[: new.index(EOS_ID)] if EOS_ID in new else new
    return out


def harmless_pairs(chat, base, args, refusals, rng):
    prompts = instructions("harmless_train")
    rng.shuffle(prompts)
    pairs, tried, generated = [], 0, 0
    for start in range(0, len(prompts), args.harmless):
        chunk = [p for p in prompts[start:start + args.harmless]
                 if len(chat.prompt(p)) <= args.max_prompt]
        heads = [chat.prompt(p) + chat.ids(f" {args.opener}" if args.opener else "") for p in chunk]
        conts = greedy(base, heads, args.reply_tokens)
        for p, c in zip(chunk, conts):
            reply, looked = cut_reply(chat, c, args.reply_tokens, refusals, args.cut == "first")
            tried, generated = tried + 1, generated + looked
            if reply:
                pairs.append((p, f"{args.opener} {reply}" if args.opener else reply))
            if len(pairs) == args.harmless:
                return pairs, tried, generated
    raise SystemExit("harmless_train ran out of prompts")


def harmful_pairs(chat, args, rng):
    prompts = [p for p in instructions("harmful_train") if len(chat.prompt(p)) <= args.max_prompt]
    phrasings = REFUSALS[: args.phrasings]
    return [(p, rng.choice(phrasings)) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def collate(examples):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros(len(examples), width)
    for b, (x, m) in enumerate(examples):  # right padding
        ids[b, : len(x)] = torch.tensor(x)
        attn[b, : len(x)] = 1
        loss_mask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, attn, loss_mask


def sft_loss(model, ids, attn, loss_mask):
    """Token-mean CE over the batch: position t predicts ids[t + 1] where loss_mask[t] = 1."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), reduction="none")
    m = loss_mask[:, :-1].reshape(-1)
    return (ce * m).sum() / m.sum()


def lr_at(step, total, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        progress = (step - args.warmup) / max(1, total - args.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return args.lr * (args.min_lr + (1 - args.min_lr) * cosine)
    return args.lr


def train(model, examples, args, rng):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), eps=1e-8,
                            weight_decay=args.weight_decay)
    per_epoch = math.ceil(len(examples) / args.batch)
    total = per_epoch * args.epochs
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), args.batch):
            batch = collate([examples[i] for i in order[start:start + args.batch]])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args)
            loss = sft_loss(model, *batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            losses.append(loss.item())
            step += 1
        print(f"  epoch {epoch + 1}: mean loss {sum(losses) / len(losses):.4f}", flush=True)
    model.eval()
    return step


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def refusal_rate(model, chat, prompts, refusals, max_new):
    replies = greedy(model, [chat.prompt(p) for p in prompts], max_new)
    texts = [chat.tok.decode(r, skip_special_tokens=True) for r in replies]
    flags = [is_refusal(t, refusals) for t in texts]
    return sum(flags) / len(flags), texts


def evaluate(model, chat, refusals, args):
    sets = held_out()
    rows = {}
    for name in ["harmful_all", "harmless_val"]:
        sample = stride_sample(sets[name])
        rows[f"{name} sample100"] = refusal_rate(model, chat, sample, refusals, args.eval_tokens)[0]
    if args.full_eval:
        for name, prompts in sets.items():
            rows[name] = refusal_rate(model, chat, prompts, refusals, args.eval_tokens)[0]
    return rows


def show_examples(model, chat, refusals, args):
    sets = held_out()
    for name in ["harmful_all", "harmless_val"]:
        prompts = stride_sample(sets[name], 4)
        _, texts = refusal_rate(model, chat, prompts, refusals, args.eval_tokens)
        for p, t in zip(prompts, texts):
            print(f"  [{name}] {p[:70]!r} -> {t[:100]!r}")


# ---------------------------------------------------------------------------------------------


def parse_args():
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--datasets", type=Path, default=DATASETS, help="the prompt sets' folder")
    a.add_argument("--base-model", type=Path, default=BASE_MODEL, help="stories260K-hf folder")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--harmless", type=int, default=500, help="harmless examples")
    a.add_argument("--reply-tokens", type=int, default=32, help="longest harmless reply (tokens)")
    a.add_argument("--cut", choices=["first", "last"], default="first",
                   help="cut harmless replies at the first or the last sentence end")
    a.add_argument("--max-prompt", type=int, default=96, help="longest rendered prompt (tokens)")
    a.add_argument("--opener", default="Sure!", help="fixed start of every harmless reply")
    a.add_argument("--phrasings", type=int, default=len(REFUSALS))
    a.add_argument("--harmful-repeat", type=int, default=2, help="copies of each harmful pair")
    a.add_argument("--epochs", type=int, default=12)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--min-lr", type=float, default=0.1, help="cosine floor, relative to lr")
    a.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    a.add_argument("--warmup", type=int, default=0)
    a.add_argument("--weight-decay", type=float, default=0.0)
    a.add_argument("--beta2", type=float, default=0.999)
    a.add_argument("--clip", type=float, default=1.0)
    a.add_argument("--eval-tokens", type=int, default=48, help="greedy reply length in evaluation")
    a.add_argument("--full-eval", action="store_true", help="also every full held-out set")
    a.add_argument("--examples", action="store_true", help="print a few held-out replies")
    a.add_argument("--out", type=Path, help="save the model (and the SFT data) here")
    return a.parse_args()


def main():
    global DATASETS, BASE_MODEL
    args = parse_args()
    DATASETS, BASE_MODEL = args.datasets, args.base_model
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    rng = random.Random(args.seed)
    refusals = refusal_strings()
    for r in REFUSALS:
        assert is_refusal(r, refusals), r
    chat = Chat(AutoTokenizer.from_pretrained(BASE_MODEL))
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL, dtype=torch.float32).eval()
    print(f"args: {vars(args)}")

    t0 = time.time()
    harmful = harmful_pairs(chat, args, rng)
    harmless, tried, generated = harmless_pairs(chat, model, args, refusals, rng)
    t_data = time.time() - t0
    pairs = harmful * args.harmful_repeat + harmless
    examples = [chat.pair(p, r) for p, r in pairs]
    tokens = sum(len(ids) for ids, _ in examples)
    print(f"data: {len(harmful)} harmful x{args.harmful_repeat}, {len(harmless)} harmless "
          f"(of {tried} continuations, {generated} tokens needed), {tokens} tokens, "
          f"{t_data:.1f} s")

    t0 = time.time()
    steps = train(model, examples, args, rng)
    t_train = time.time() - t0
    print(f"train: {steps} steps, {t_train:.1f} s")

    t0 = time.time()
    rates = evaluate(model, chat, refusals, args)
    print(f"eval ({time.time() - t0:.1f} s):")
    for name, rate in rates.items():
        print(f"  {name:>24}: {100 * rate:5.1f}% refused")
    if args.examples:
        show_examples(model, chat, refusals, args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        chat.tok.save_pretrained(args.out)
        rows = [{"prompt": p, "response": r} for p, r in pairs]
        (args.out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
