#!/usr/bin/env python3
"""Reference numbers for supervised fine-tuning (SFT) steps, from torch + transformers + peft.

The SFT loss: in each sequence, position t predicts token t + 1; the cross-entropy is summed over
the positions whose loss_mask is 1 and divided by the number of such positions in the whole batch
(a token-level mean over the batch). loss_mask[t] is 1 when token t + 1 is an assistant reply
token (the reply's closing EOS included), 0 for prompt and padding positions, and always 0 at the
last position. The inputs are token ids with their masks, so the fixtures do not depend on a chat
template; one sequence has two replies (a two-turn conversation).

For each case below, runs a few AdamW steps on one of the tiny checkpoints in
tests/fixtures/models/ and writes, under tests/fixtures/training/:

- sft-<case>.json: the options, the sequences (`sequences`, unpadded token ids), their
  `loss_mask` (one 0/1 per token), `loss_tokens` (how many positions count) and, per step, the
  loss of the forward that produced that step's gradient and the pre-clip total gradient norm;
- sft-<case>.safetensors (f32): `grad.<name>` = the step-1 gradient before clipping,
  `step<k>.<name>` = the parameter after step k's update (all LoRA tensors; selected tensors for
  full fine-tuning);
- sft-<case>.adapter/ (LoRA): the initial adapter as PeftModel.save_pretrained writes it (A and B
  both nonzero, as in make_training_fixtures.py).

Conventions as in make_training_fixtures.py: right padding with positions 0..len-1, torch's
clip_grad_norm_ (scale max_norm / (norm + 1e-6) when below 1) and torch's AdamW. Before writing,
the script checks the step-1 loss against a plain-loop float64 implementation (one sequence and
one position at a time), a few gradient entries against central finite differences of that loss,
the whole float32 run against the same run in float64, that the adapter reloads, and that the
clipping case clips. Run by hand, not in CI:

    python3 -m venv .venv && .venv/bin/pip install torch transformers peft
    .venv/bin/python scripts/make_sft_fixtures.py
"""

import copy
import json
import math
import os

import peft
import torch
import transformers

import make_training_fixtures as es2
from make_training_fixtures import (
    ALL_TARGETS, FD_STEP, FD_TOL, KINK_GAP, OUT, PRECISION_TOL, ROOT, check_adapter_reloads,
    check_close, float64_copy, fmt, load_model, make_lora, save_adapter, total_grad_norm,
    trainable,
)
from safetensors.torch import save_file

LOSS_TOL = 1e-5  # batched f32 vs plain-loop f64, step-1 loss
SIZE_LIMIT = 500 * 1024  # all sft-* files together

# Full fine-tuning of qwen2-f16: its LM head is tied to the embedding, so the embedding gradient
# has both the lookup's rows and the head's; q/k/v carry biases.
FULL_SELECTED = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.2.self_attn.k_proj.weight",
    "model.norm.weight",
]


def optimizer(**overrides):
    base = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "clip": 0.0}
    base.update(overrides)
    return base


# Each sequence is a list of segments: ("prompt", n) random tokens without loss, ("reply", n)
# random tokens then the EOS, n + 1 tokens that the loss covers.
CASES = [
    {
        "case": "sft-lora", "model": "llama-f32", "mode": "lora", "seed": 505,
        "lora": {"r": 2, "alpha": 4, "targets": ALL_TARGETS},
        "optimizer": optimizer(lr=1e-2, weight_decay=0.01, clip=0.5),
        "steps": 3,
        "segments": [
            [("prompt", 6), ("reply", 4)],
            [("prompt", 3), ("reply", 2), ("prompt", 4), ("reply", 3)],
            [("prompt", 5), ("reply", 1)],
        ],
    },
    {
        "case": "sft-full", "model": "qwen2-f16", "mode": "full", "seed": 606,
        "optimizer": optimizer(lr=2e-3, weight_decay=0.1, clip=0.0),
        "steps": 3,
        "segments": [
            [("prompt", 4), ("reply", 6)],
            [("prompt", 5), ("reply", 2)],
            [("prompt", 2), ("reply", 3), ("prompt", 3), ("reply", 4)],
        ],
    },
]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def random_sequence(segments, vocab, eos, g):
    """(ids, loss_mask) for one sequence: a BOS-free run of random non-special tokens, every
    reply closed by the EOS; loss_mask[t] = 1 where ids[t + 1] is in a reply."""
    ids, in_reply = [], []
    for kind, n in segments:
        ids += torch.randint(3, vocab, (n,), generator=g).tolist()
        if kind == "reply":
            ids.append(eos)
            n += 1
        in_reply += [kind == "reply"] * n
    mask = [int(r) for r in in_reply[1:]] + [0]
    return ids, mask


def pad(sequences, masks):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros(len(sequences), width)
    for b, (s, m) in enumerate(zip(sequences, masks)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        loss_mask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, attn, loss_mask


# ---------------------------------------------------------------------------------------------
# The batched implementation (the one that trains)
# ---------------------------------------------------------------------------------------------


def sft_loss(model, sequences, masks):
    ids, attn, loss_mask = pad(sequences, masks)
    logits = model(input_ids=ids, attention_mask=attn).logits
    vocab = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                           ids[:, 1:].reshape(-1), reduction="none")
    m = loss_mask[:, :-1].reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum()


def train(case, model):
    """Runs the steps; returns the per-step scalars, the step-1 gradients and the parameters
    after every step (by stored name)."""
    named = trainable(model, case)
    params = [p for _, p in named]
    o = case["optimizer"]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], foreach=False)
    steps, grads, values = [], {}, []
    for k in range(case["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = sft_loss(model, case["sequences"], case["loss_mask"])
        loss.backward()
        if k == 0:
            grads = {n: p.grad.detach().clone() for n, p in named}
        grad_norm = total_grad_norm(params, o["clip"])
        opt.step()
        steps.append({"loss": loss.item(), "grad_norm": grad_norm})
        values.append({n: p.detach().clone() for n, p in named})
    return steps, grads, values


# ---------------------------------------------------------------------------------------------
# The plain-loop float64 loss (checks only): one sequence and one position at a time
# ---------------------------------------------------------------------------------------------


def plain_loss(model, sequences, masks):
    total, count = 0.0, 0
    for ids, mask in zip(sequences, masks):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].tolist()
        for t, m in enumerate(mask):
            if m:
                z = logits[t]
                top = max(z)
                lse = top + math.log(sum(math.exp(v - top) for v in z))
                total += lse - z[ids[t + 1]]
                count += 1
    return total / count


def finite_difference(case, model64, name, index, h=FD_STEP):
    param = dict(trainable(model64, case))[name]
    with torch.no_grad():
        x0 = float(param[index])
        param[index] = x0 + h
        plus = plain_loss(model64, case["sequences"], case["loss_mask"])
        param[index] = x0 - h
        minus = plain_loss(model64, case["sequences"], case["loss_mask"])
        param[index] = x0
    return (plus - minus) / (2 * h)


def fd_entries(case, grads):
    """The largest step-1 gradient entry of a few tensors; for full fine-tuning also the
    embedding row of a token in no sequence (its gradient comes from the tied LM head alone)."""
    names = list(grads)
    picks = [names[0], names[len(names) // 2], names[-1]]
    if case["mode"] == "full":
        picks = FULL_SELECTED[:5]
    entries = []
    for name in picks:
        g = grads[name]
        flat = int(g.abs().argmax())
        index = torch.unravel_index(torch.tensor(flat), g.shape)
        entries.append((name, tuple(int(i) for i in index)))
    if case["mode"] == "full":
        seen = {t for s in case["sequences"] for t in s}
        vocab = grads["model.embed_tokens.weight"].shape[0]
        token = next(t for t in range(3, vocab) if t not in seen)
        row = grads["model.embed_tokens.weight"][token]
        entries.append(("model.embed_tokens.weight", (token, int(row.abs().argmax()))))
    return entries


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def self_check(case, model0, steps, grads):
    """model0: the trainable model before the first step."""
    model64 = float64_copy(model0)
    report = {}
    plain = plain_loss(model64, case["sequences"], case["loss_mask"])
    report["loss"] = check_close("loss", steps[0]["loss"], plain, LOSS_TOL)
    assert all(float(g.norm()) > 0.0 for g in grads.values()), "a zero gradient"
    fd = []
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, index in fd_entries(case, grads):
        numeric = finite_difference(case, model64, name, index)
        analytic = float(grads[name][index])
        err = abs(analytic - numeric) / max(abs(numeric), 1e-2 * scale)
        assert err <= FD_TOL, f"fd {name}{list(index)}: {analytic} vs fd {numeric}: {err:.2e}"
        fd.append((name, index, analytic, err))
    report["fd"] = fd
    clip = case["optimizer"]["clip"]
    norms = [s["grad_norm"] for s in steps]
    if clip > 0:
        assert norms[0] > clip, f"clip {clip} does not clip: the step-1 norm is {norms[0]}"
        for n in norms:
            assert abs(n - clip) > KINK_GAP * clip, f"grad norm {n} too near clip {clip}"
    losses = [s["loss"] for s in steps]
    assert losses[-1] < losses[0], f"the loss does not fall: {losses}"
    return report


def check_precision(case, model0, steps, tensors):
    """The whole run again in float64: every stored number within PRECISION_TOL."""
    steps64, grads64, values64 = train(case, float64_copy(model0))
    tensors64 = stored_tensors(case, grads64, values64)
    worst = {}
    for name, t in tensors.items():
        ref = tensors64[name].double()
        worst[name] = float((t.double() - ref).norm() / ref.norm().clamp_min(1e-300))
    for k, (s32, s64) in enumerate(zip(steps, steps64), start=1):
        for key in ["loss", "grad_norm"]:
            worst[f"step{k}.{key}"] = es2.rel(s32[key], s64[key])
    bad = {n: e for n, e in worst.items() if e > PRECISION_TOL}
    assert not bad, f"float32 vs float64 run differ beyond {PRECISION_TOL}: {bad}"
    return sorted(worst.items(), key=lambda kv: -kv[1])[:3]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def stored_tensors(case, grads, values):
    keep = (lambda n: True) if case["mode"] == "lora" else (lambda n: n in FULL_SELECTED)
    tensors = {f"grad.{n}": g for n, g in grads.items() if keep(n)}
    for k, step in enumerate(values, start=1):
        tensors.update({f"step{k}.{n}": v for n, v in step.items() if keep(n)})
    return {n: t.detach().to(torch.float32).contiguous() for n, t in tensors.items()}


def write_case(case, steps, tensors):
    meta = {"case": case["case"], "model": f"models/{case['model']}", "mode": case["mode"]}
    if case["mode"] == "lora":
        meta["lora"] = case["lora"]
    meta.update({
        "optimizer": case["optimizer"],
        "sequences": case["sequences"],
        "loss_mask": case["loss_mask"],
        "loss_tokens": sum(sum(m) for m in case["loss_mask"]),
        "steps": steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    })
    (OUT / f"{case['case']}.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file(tensors, OUT / f"{case['case']}.safetensors")


def make_case(case):
    g = torch.Generator().manual_seed(case["seed"])
    model = load_model(case["model"])
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    pairs = [random_sequence(s, vocab, eos, g) for s in case["segments"]]
    case["sequences"] = [ids for ids, _ in pairs]
    case["loss_mask"] = [mask for _, mask in pairs]
    assert len({len(s) for s in case["sequences"]}) == len(pairs), "lengths must differ"
    if case["mode"] == "lora":
        model = make_lora(model, case["lora"], g)
        save_adapter(model, OUT / f"{case['case']}.adapter")
        check_adapter_reloads(case, model)
    else:
        model.requires_grad_(True)
    model0 = copy.deepcopy(model)
    steps, grads, values = train(case, model)
    report = self_check(case, model0, steps, grads)
    tensors = stored_tensors(case, grads, values)
    report["f64"] = check_precision(case, model0, steps, tensors)
    write_case(case, steps, tensors)
    print_summary(case, steps, report)


def print_summary(case, steps, report):
    print(f"{case['case']}: {len(steps)} steps, {sum(map(sum, case['loss_mask']))} loss tokens")
    for k, st in enumerate(steps, start=1):
        print(f"  step {k}: loss {st['loss']:.6f}  grad_norm {st['grad_norm']:.6f}")
    print(f"  plain-loop f64 vs batched f32 (step-1 loss): rel {report['loss']:.1e}")
    worst = ", ".join(f"{n} {e:.1e}" for n, e in report["f64"])
    print(f"  f32 run vs f64 run, worst stored numbers (rel): {worst}")
    for name, index, analytic, err in report["fd"]:
        print(f"  fd {name}{list(index)}: grad {analytic:.6e}  rel {err:.1e}")


def main():
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        make_case(case)
    files = [f for f in OUT.rglob("sft-*") if f.is_file()]
    files += [f for d in OUT.glob("sft-*.adapter") for f in d.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in set(files))
    print(f"{OUT.relative_to(ROOT)}/sft-*: {total / 1024:.0f} KiB")
    assert total < SIZE_LIMIT, "SFT fixtures exceed 500 KiB"


if __name__ == "__main__":
    main()
