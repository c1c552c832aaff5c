#!/usr/bin/env python3
"""Reference numbers for ES2 training steps, from an independent implementation (torch + peft).

For each case below, runs a few AdamW steps of the ES2 objective (ARCHITECTURE.md, "The ES2
objective") on one of the tiny checkpoints in tests/fixtures/models/ and writes, under
tests/fixtures/training/:

- <case>.json: the options, the token-id prompts, the base-model constants (nu_l, D_l(base), m_l)
  and, per step, the scalars of the forward that produced that step's gradient (loss, L_sep,
  L_KL, the per-layer distance D_l, the pre-clip total gradient norm);
- <case>.safetensors (f32): `grad.<name>` = the step-1 gradient before clipping, `step<k>.<name>`
  = the parameter after step k's update, and `base.centroid` [len(layers), C] for base-centroid;
- <case>.adapter/ (LoRA cases): the initial adapter as PeftModel.save_pretrained writes it, for
  the engine to start from the same random A and B (both nonzero, so every gradient and the KL
  are nonzero at step 1).

The script checks itself before writing anything: the step-1 L_sep and L_KL (and the base
constants) against a second, plain-loop float64 implementation (one prompt at a time, one layer,
pair and position at a time), a few gradient entries against central finite differences of that
plain-loop loss in float64, that the hinge is active and away from its kink, and that the
clipping case clips. Run by hand, not in CI (CI only reads what this wrote):

    python3 -m venv .venv && .venv/bin/pip install torch transformers peft
    .venv/bin/python scripts/make_training_fixtures.py

Conventions the engine must share: prompts are right-padded with positions 0..len-1; e_l is
transformers' hidden_states[l + 1], so the last block's embedding is taken after the final norm;
clipping is torch's clip_grad_norm_ (scale max_norm / (norm + 1e-6) when that is below 1); AdamW is
torch's (decoupled decay p *= 1 - lr * wd first; eps added to sqrt(v_hat)). `margin` is always
recorded (default 3) and base.margin always computed, even where margin_abs overrides it or the
shape is `neg`. Full fine-tuning starts at the base weights, so its step-1 KL and LM-head gradient
are exactly zero (the KL backward is written out so that they are zero, not rounding noise).
"""

import copy
import json
import math
import os
import shutil
import types
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODELS_REL = Path("tests") / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "training"

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_INIT_STD = 0.2
# The full-fine-tuning parameters whose gradient and updated values are stored.
FULL_SELECTED = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.2.self_attn.k_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]

CONSTANTS_TOL = 1e-5  # batched f32 vs plain-loop f64: base constants, L_sep, L_KL, D_l
FD_STEP = 1e-3
FD_TOL = 1e-4  # f32 autograd gradient entry vs f64 central difference
# Every stored number: the float32 run vs the same run in float64. Not 1e-5: a small KL between
# two nearby models (full fine-tuning, step 2) is a difference of nearly equal f32 log-probs.
PRECISION_TOL = 1e-4
KINK_GAP = 1e-2  # hinge: (m - D) / m must stay above this; clipping: norm / clip too


def objective(**overrides):
    base = {
        "layers": [], "pool": "last", "pair": "centroid", "distance": "l2", "shape": "hinge",
        "margin": 3.0, "margin_abs": None, "harmful_only": False, "lambda": 1.0,
        "temperature": 1.0, "kl_dir": "forward",
    }
    base.update(overrides)
    return base


def optimizer(**overrides):
    base = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "clip": 0.0}
    base.update(overrides)
    return base


CASES = [
    {
        "case": "lora-centroid-l2-hinge", "model": "llama-f32", "mode": "lora", "seed": 101,
        "lora": {"r": 4, "alpha": 8, "targets": ALL_TARGETS},
        "objective": objective(layers=[0, 2], pool="last", pair="centroid", distance="l2",
                               shape="hinge", margin=3.0),
        "optimizer": optimizer(lr=1e-2, weight_decay=0.01, clip=1.0),
        "steps": 3, "harmful_lengths": [6, 9, 4], "harmless_lengths": [7, 5],
    },
    {
        "case": "full-pairwise-sqL2-neg", "model": "llama-f32", "mode": "full", "seed": 202,
        "objective": objective(layers=[0, 1, 2], pool="mean", pair="pairwise", distance="sq-l2",
                               shape="neg", harmful_only=True, temperature=2.0, kl_dir="reverse",
                               **{"lambda": 0.5}),
        "optimizer": optimizer(lr=1e-3, weight_decay=0.0, clip=0.0),
        "steps": 2, "harmful_lengths": [5, 8], "harmless_lengths": [6, 3, 9],
    },
    {
        # Last-token embeddings of a random model are nearly orthogonal (cosine distance ~0.9), so
        # the absolute margin 0.6 needs prompts that happen to be close: the seed is the first of
        # 0..149 whose step-1 distance is below 0.6 by a clear gap (0.517).
        "case": "lora-basecentroid-cosine-hinge", "model": "qwen2-f16", "mode": "lora", "seed": 24,
        "lora": {"r": 3, "alpha": 6, "targets": ["q_proj", "v_proj", "down_proj"]},
        "objective": objective(layers=[1], pool="last", pair="base-centroid", distance="cosine",
                               shape="hinge", margin_abs=0.6, **{"lambda": 2.0}),
        "optimizer": optimizer(lr=5e-3, weight_decay=0.0, clip=0.05),
        "steps": 3, "harmful_lengths": [7, 4], "harmless_lengths": [5, 6],
    },
    {
        "case": "lora-pairwise-l2-neg-mean", "model": "llama-f32", "mode": "lora", "seed": 404,
        "lora": {"r": 2, "alpha": 2, "targets": ALL_TARGETS},
        "objective": objective(layers=[1], pool="mean", pair="pairwise", distance="l2",
                               shape="neg", temperature=0.7, kl_dir="reverse"),
        "optimizer": optimizer(lr=1e-2, weight_decay=0.0, clip=0.0),
        "steps": 2, "harmful_lengths": [5, 7], "harmless_lengths": [8, 4],
    },
]

# ---------------------------------------------------------------------------------------------
# Setup: prompts, models, LoRA
# ---------------------------------------------------------------------------------------------


def random_prompts(vocab, lengths, g):
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def load_model(name):
    # A relative path, so that the adapter's base_model_name_or_path is too (cwd is ROOT).
    return AutoModelForCausalLM.from_pretrained(
        str(MODELS_REL / name), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def adapter_name(peft_name):
    """PeftModel parameter name -> the key save_pretrained writes (the adapter name dropped)."""
    return peft_name.replace(".default.", ".")


def make_lora(model, lora, g):
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]),
                        lora_dropout=0.0, bias="none")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(LORA_INIT_STD * torch.randn(p.shape, generator=g))
    return model


def save_adapter(model, out_dir):
    """save_pretrained, then drop the generated model card and sort target_modules (peft stores
    them as a set, so their order would change from run to run)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)
    config_path = out_dir / "adapter_config.json"
    text = config_path.read_text()
    config = json.loads(text)
    assert json.dumps(config, indent=2, sort_keys=True) == text, "peft's json layout changed"
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def check_adapter_reloads(case, model):
    """The saved adapter loads back with PeftModel.from_pretrained to exactly the initial LoRA
    weights, under the names the fixture's tensors use."""
    out_dir = OUT / f"{case['case']}.adapter"
    saved = load_file(out_dir / "adapter_model.safetensors")
    ours = dict(trainable(model, case))
    assert set(saved) == set(ours), "adapter keys differ from the stored parameter names"
    reloaded = dict(trainable(PeftModel.from_pretrained(load_model(case["model"]), out_dir,
                                                        is_trainable=True), case))
    for name, p in ours.items():
        assert torch.equal(saved[name], p) and torch.equal(reloaded[name], p), name


def trainable(model, case):
    """(stored name, parameter) for every trainable parameter, in named_parameters order."""
    if case["mode"] == "lora":
        return [(adapter_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in model.named_parameters()]


# ---------------------------------------------------------------------------------------------
# The batched implementation (the one that trains)
# ---------------------------------------------------------------------------------------------


def pad(prompts):
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = 1
    return ids, mask, lengths


def forward(model, prompts):
    ids, mask, lengths = pad(prompts)
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True), mask, lengths


def pooled(out, mask, lengths, layers, pool):
    """[len(layers), N, C]: e_l = hidden_states[l + 1], at the last token or meaned over tokens."""
    rows = []
    for l in layers:
        h = out.hidden_states[l + 1]
        if pool == "last":
            rows.append(h[torch.arange(h.shape[0]), lengths - 1])
        else:
            rows.append((h * mask[..., None]).sum(1) / lengths[:, None])
    return torch.stack(rows)


def distance(a, b, kind, nu):
    """d(a, b) over the last dimension; nu broadcasts against the leading ones."""
    if kind == "l2":
        return (a - b).norm(dim=-1) / nu
    if kind == "sq-l2":
        return ((a - b) ** 2).sum(-1) / nu**2
    return 1.0 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def separation(H, S, obj, nu, centroid):
    """D_l for every chosen layer: H [L, nh, C], S [L, ns, C] -> [L]."""
    kind = obj["distance"]
    if obj["pair"] == "centroid":
        return distance(H.mean(1), S.mean(1), kind, nu)
    if obj["pair"] == "pairwise":
        return distance(H[:, :, None], S[:, None, :], kind, nu[:, None, None]).mean((1, 2))
    return distance(H, centroid[:, None, :], kind, nu[:, None]).mean(1)


class KlPerToken(torch.autograd.Function):
    """T^2 KL per token (last dimension = vocabulary), with p = softmax(z_base / T) and
    q = softmax(z_theta / T); the gradient reaches z_theta only.

    The backward is written out (checked by gradcheck in main) rather than left to autograd:
    forward KL(p||q) gives T (q - p), reverse KL(q||p) gives T q (r - sum q r) with
    r = log q - log p. Both are exactly zero when z_theta equals z_base bit for bit, as at the first
    step of full fine-tuning, where autograd's log_softmax backward would leave rounding noise of
    about 1e-9 that AdamW's first step then blows up to lr-sized updates (noise no engine can
    reproduce)."""

    @staticmethod
    def forward(ctx, z_theta, z_base, T, direction):
        log_p = torch.log_softmax(z_base / T, -1)
        log_q = torch.log_softmax(z_theta / T, -1)
        p, q = log_p.exp(), log_q.exp()
        ctx.T, ctx.direction = T, direction
        ctx.save_for_backward(p, q, log_q - log_p)
        if direction == "forward":
            return (p * (log_p - log_q)).sum(-1) * T * T
        return (q * (log_q - log_p)).sum(-1) * T * T

    @staticmethod
    def backward(ctx, grad_out):
        p, q, r = ctx.saved_tensors
        if ctx.direction == "forward":
            dz = ctx.T * (q - p)
        else:
            dz = ctx.T * q * (r - (q * r).sum(-1, keepdim=True))
        return dz * grad_out[..., None], None, None, None


def kl_per_token(z_theta, z_base, T, direction):
    return KlPerToken.apply(z_theta, z_base, T, direction)


def check_kl_backward():
    g = torch.Generator().manual_seed(7)
    for direction in ["forward", "reverse"]:
        for T in [1.0, 0.7, 2.0]:
            z = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
            zb = torch.randn(3, 11, generator=g, dtype=torch.float64)
            assert torch.autograd.gradcheck(lambda x: kl_per_token(x, zb, T, direction), (z,))


class Base:
    """What the frozen base model gives: its logits and embeddings, and the constants of the
    objective (nu_l, D_l(base), m_l, the harmless centroid), computed once before training."""

    def __init__(self, case, model):
        self.case = case
        if case["mode"] == "lora":
            self.model = model
        else:
            self.model = copy.deepcopy(model).requires_grad_(False)

    def run(self, prompts):
        with torch.no_grad():
            if self.case["mode"] == "lora":
                with self.model.disable_adapter():
                    return forward(self.model, prompts)
            return forward(self.model, prompts)

    def constants(self, harmful, harmless):
        obj = self.case["objective"]
        out_h, mask_h, len_h = self.run(harmful)
        out_s, mask_s, len_s = self.run(harmless)
        H = pooled(out_h, mask_h, len_h, obj["layers"], obj["pool"])
        S = pooled(out_s, mask_s, len_s, obj["layers"], obj["pool"])
        self.nu = S.norm(dim=-1).mean(1)
        self.centroid = S.mean(1)
        self.base_distance = separation(H, S, obj, self.nu, self.centroid)
        if obj["margin_abs"] is not None:
            self.margin = torch.full_like(self.base_distance, obj["margin_abs"])
        else:
            self.margin = obj["margin"] * self.base_distance
        self.logits = out_s.logits


def es2_loss(model, base, harmful, harmless):
    obj = base.case["objective"]
    out_h, mask_h, len_h = forward(model, harmful)
    out_s, mask_s, len_s = forward(model, harmless)
    H = pooled(out_h, mask_h, len_h, obj["layers"], obj["pool"])
    S = pooled(out_s, mask_s, len_s, obj["layers"], obj["pool"])
    if obj["harmful_only"]:
        S = S.detach()
    D = separation(H, S, obj, base.nu, base.centroid)
    phi = torch.clamp(base.margin - D, min=0.0) if obj["shape"] == "hinge" else -D
    sep = phi.mean()
    per_token = kl_per_token(out_s.logits, base.logits, obj["temperature"], obj["kl_dir"])
    kl = (per_token * mask_s).sum() / mask_s.sum()
    return sep + obj["lambda"] * kl, sep, kl, D


def total_grad_norm(params, clip):
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm=clip, foreach=False))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def train(case, model, base, harmful, harmless):
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
        loss, sep, kl, D = es2_loss(model, base, harmful, harmless)
        loss.backward()
        if k == 0:
            grads = {n: p.grad.detach().clone() for n, p in named}
        grad_norm = total_grad_norm(params, o["clip"])
        opt.step()
        steps.append({"loss": loss.item(), "sep": sep.item(), "kl": kl.item(),
                      "distance": D.tolist(), "grad_norm": grad_norm})
        values.append({n: p.detach().clone() for n, p in named})
    return steps, grads, values


# ---------------------------------------------------------------------------------------------
# The plain-loop float64 implementation (checks only): one prompt, layer, pair, position at a time
# ---------------------------------------------------------------------------------------------


def inner(model):
    """The *ForCausalLM under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run_one(model, prompt, layers, adapters=True):
    """One unpadded prompt: per chosen layer, the block's output as lists of floats per position
    (the last block through the final RMSNorm, written out here), and the logits per position."""
    captured = {}
    hf = inner(model)
    blocks = hf.model.layers
    hooks = [blocks[l].register_forward_hook(
        lambda mod, inp, out, l=l: captured.__setitem__(l, out[0] if isinstance(out, tuple) else out))
        for l in layers]
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            if adapters or not hasattr(model, "disable_adapter"):
                logits = model(input_ids=ids).logits[0]
            else:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0]
    finally:
        for h in hooks:
            h.remove()
    norm = hf.model.norm
    out = {}
    for l in layers:
        x = captured[l][0].tolist()
        if l == len(blocks) - 1:
            x = [rms_norm(row, norm.weight.tolist(), norm.variance_epsilon) for row in x]
        out[l] = x
    return out, logits.tolist()


def rms_norm(x, w, eps):
    scale = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [v * scale * wi for v, wi in zip(x, w)]


def pool_one(rows, pool):
    if pool == "last":
        return rows[-1]
    total = [0.0] * len(rows[0])
    for row in rows:
        total = [a + b for a, b in zip(total, row)]
    return [v / len(rows) for v in total]


def norm2(v):
    return math.sqrt(sum(x * x for x in v))


def dist_one(a, b, kind, nu):
    diff = [x - y for x, y in zip(a, b)]
    if kind == "l2":
        return norm2(diff) / nu
    if kind == "sq-l2":
        return sum(x * x for x in diff) / (nu * nu)
    return 1.0 - sum(x * y for x, y in zip(a, b)) / (norm2(a) * norm2(b))


def mean_vec(vectors):
    return [sum(col) / len(vectors) for col in zip(*vectors)]


def separation_one(h, s, obj, nu, centroid):
    kind = obj["distance"]
    if obj["pair"] == "centroid":
        return dist_one(mean_vec(h), mean_vec(s), kind, nu)
    if obj["pair"] == "pairwise":
        return sum(dist_one(a, b, kind, nu) for a in h for b in s) / (len(h) * len(s))
    return sum(dist_one(a, centroid, kind, nu) for a in h) / len(h)


def log_softmax(z):
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def kl_one(z_theta, z_base, T, direction):
    log_p = log_softmax([v / T for v in z_base])
    log_q = log_softmax([v / T for v in z_theta])
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    return T * T * sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def float64_copy(model):
    """A float64 copy of `model` (see to_float64)."""
    return to_float64(copy.deepcopy(model))


def to_float64(model):
    """`model` (a *ForCausalLM or a PeftModel over one), changed in place to stay float64
    throughout: transformers' RMSNorm and eager softmax cast to float32 (rounding noise that
    finite differences would amplify), so it gets SDPA attention and a float64 RMSNorm. (RoPE's
    cos/sin stay float32 values: constants, harmless.) scripts/check_shape_step.py uses it too."""
    model = model.to(torch.float64)
    inner(model).set_attn_implementation("sdpa")
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_forward, module)
    return model


def rms_norm_forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class PlainReference:
    """The objective again, from per-prompt forwards of float64 copies of the models."""

    def __init__(self, case, model, harmful, harmless):
        self.case, self.harmful, self.harmless = case, harmful, harmless
        obj = case["objective"]
        self.model = float64_copy(model)
        base_model = self.model if case["mode"] == "lora" else copy.deepcopy(self.model)
        base_h = [self.embed(base_model, p, adapters=False)[0] for p in harmful]
        base_s = [self.embed(base_model, p, adapters=False) for p in harmless]
        self.base_logits = [logits for _, logits in base_s]
        base_s = [e for e, _ in base_s]
        self.nu, self.centroid, self.base_distance, self.margin = [], [], [], []
        for i, _ in enumerate(obj["layers"]):
            nu = sum(norm2(e[i]) for e in base_s) / len(base_s)
            centroid = mean_vec([e[i] for e in base_s])
            d = separation_one([e[i] for e in base_h], [e[i] for e in base_s], obj, nu, centroid)
            self.nu.append(nu)
            self.centroid.append(centroid)
            self.base_distance.append(d)
            self.margin.append(obj["margin_abs"] if obj["margin_abs"] is not None else obj["margin"] * d)
        self.frozen_harmless = None

    def embed(self, model, prompt, adapters=True):
        obj = self.case["objective"]
        rows, logits = run_one(model, prompt, obj["layers"], adapters)
        return [pool_one(rows[l], obj["pool"]) for l in obj["layers"]], logits

    def loss(self):
        """(L, L_sep, L_KL, [D_l]) at the current parameters of self.model. With harmful_only, the
        harmless embeddings in L_sep are those of the first call (the unperturbed parameters),
        which is what detaching them means for a derivative."""
        obj = self.case["objective"]
        h = [self.embed(self.model, p)[0] for p in self.harmful]
        s = [self.embed(self.model, p) for p in self.harmless]
        logits = [z for _, z in s]
        s = [e for e, _ in s]
        if obj["harmful_only"]:
            if self.frozen_harmless is None:
                self.frozen_harmless = s
            s = self.frozen_harmless
        D, phi = [], []
        for i, _ in enumerate(obj["layers"]):
            d = separation_one([e[i] for e in h], [e[i] for e in s], obj, self.nu[i], self.centroid[i])
            D.append(d)
            phi.append(max(0.0, self.margin[i] - d) if obj["shape"] == "hinge" else -d)
        sep = sum(phi) / len(phi)
        total, count = 0.0, 0
        for z_theta, z_base in zip(logits, self.base_logits):
            for t in range(len(z_theta)):
                total += kl_one(z_theta[t], z_base[t], obj["temperature"], obj["kl_dir"])
                count += 1
        kl = total / count
        return sep + obj["lambda"] * kl, sep, kl, D

    def finite_difference(self, name, index, h=FD_STEP):
        param = dict(trainable(self.model, self.case))[name]
        with torch.no_grad():
            x0 = float(param[index])
            param[index] = x0 + h
            plus = self.loss()[0]
            param[index] = x0 - h
            minus = self.loss()[0]
            param[index] = x0
        return (plus - minus) / (2 * h)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_close(what, batched, plain, tol):
    err = rel(batched, plain)
    assert err <= tol, f"{what}: batched {batched} vs plain-loop {plain}: rel {err:.2e} > {tol}"
    return err


def fd_entries(case, grads):
    """A few entries with large step-1 gradients: in the first and the last trainable tensor, and
    for full fine-tuning in the LM head and an embedding row of a harmless-only token."""
    names = list(grads)
    picks = [names[0], names[len(names) // 2], names[-1]]
    if case["mode"] == "full":
        picks = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    entries = []
    for name in picks:
        g = grads[name]
        flat = int(g.abs().argmax())
        entries.append((name, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape))))
    if case["mode"] == "full":
        harmful_tokens = {t for p in case["harmful"] for t in p}
        token = next(t for p in case["harmless"] for t in p if t not in harmful_tokens)
        row = grads["model.embed_tokens.weight"][token]
        entries.append(("model.embed_tokens.weight", (token, int(row.abs().argmax()))))
    return entries


def self_check(case, model0, base, steps, grads):
    """model0: the trainable model before the first step."""
    obj, report = case["objective"], {}
    plain = PlainReference(case, model0, case["harmful"], case["harmless"])
    report["nu"] = check_close("nu", base.nu.tolist(), plain.nu, CONSTANTS_TOL)
    report["base_distance"] = check_close("D(base)", base.base_distance.tolist(), plain.base_distance,
                                          CONSTANTS_TOL)
    report["margin"] = check_close("margin", base.margin.tolist(), plain.margin, CONSTANTS_TOL)
    if obj["pair"] == "base-centroid":
        report["centroid"] = check_close("centroid", base.centroid.tolist(), plain.centroid, CONSTANTS_TOL)
    loss, sep, kl, D = plain.loss()
    first = steps[0]
    report["sep"] = check_close("L_sep", first["sep"], sep, CONSTANTS_TOL)
    report["kl"] = check_close("L_KL", first["kl"], kl, CONSTANTS_TOL)
    report["distance"] = check_close("D", first["distance"], D, CONSTANTS_TOL)
    report["loss"] = check_close("loss", first["loss"], loss, CONSTANTS_TOL)
    if case["mode"] == "lora":
        # Nonzero B: the adapters already move the model, so every part of the loss has a gradient.
        assert first["kl"] > 1e-4, f"KL at step 1 is {first['kl']}: the adapters do not matter"
        assert all(float(g.norm()) > 0.0 for g in grads.values()), "a zero LoRA gradient"
    else:
        # Full fine-tuning starts at the base weights: KL and its gradient are exactly zero at
        # step 1 (so the LM head, which L_sep does not reach, gets none) and nonzero after.
        assert first["kl"] == 0.0 and steps[1]["kl"] > 0.0, "full: KL must be 0 at step 1 only"
        assert float(grads["lm_head.weight"].abs().max()) == 0.0, "full: LM head gradient at step 1"
        assert all(float(g.norm()) > 0.0 for n, g in grads.items() if n != "lm_head.weight")
    fd = []
    # Entries whose true derivative is zero (full: the LM head, a harmless-only embedding row under
    # harmful_only) are measured against the case's largest gradient entry.
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, index in fd_entries(case, grads):
        numeric = plain.finite_difference(name, index)
        analytic = float(grads[name][index])
        err = abs(analytic - numeric) / max(abs(numeric), 1e-2 * scale)
        assert err <= FD_TOL, f"fd {name}{list(index)}: autograd {analytic} vs fd {numeric}: {err:.2e}"
        fd.append((name, index, analytic, err))
    report["fd"] = fd
    if obj["shape"] == "hinge":
        margin = base.margin.tolist()
        for k, step in enumerate(steps):
            for l, d, m in zip(obj["layers"], step["distance"], margin):
                # Active at step 1 (the gradient is nonzero) and never near the kink at any step,
                # where the engine's and torch's rounding could choose different sides.
                assert abs(m - d) > KINK_GAP * m, f"step {k + 1} layer {l}: D {d} too near m {m}"
                assert k > 0 or d < m, f"hinge inactive at step 1, layer {l}: D {d} >= m {m}"
    clip = case["optimizer"]["clip"]
    if clip > 0:
        norms = [s["grad_norm"] for s in steps]
        assert norms[0] > clip, f"clip {clip} does not clip: the step-1 norm is {norms[0]}"
        for n in norms:
            assert abs(n - clip) > KINK_GAP * clip, f"grad norm {n} too near clip {clip}"
    return report


def check_precision(case, model0, base, steps, tensors):
    """The whole run again in float64 (same code, float64 weights): every stored number must agree
    with the float32 run to PRECISION_TOL, so the fixture does not hinge on float32 rounding (say, a
    near-zero gradient entry that AdamW's first step turns into a full-size update)."""
    base64, steps64, grads64, values64 = run(case, float64_copy(model0))
    tensors64 = stored_tensors(case, base64, grads64, values64)
    worst = {}
    for name, t in tensors.items():
        ref = tensors64[name].double()
        worst[name] = float((t.double() - ref).norm() / ref.norm().clamp_min(1e-300))
    for k, (s32, s64) in enumerate(zip(steps, steps64), start=1):
        for key in ["loss", "sep", "kl", "distance", "grad_norm"]:
            if s64[key] != 0.0:
                worst[f"step{k}.{key}"] = rel(s32[key], s64[key])
    bad = {n: e for n, e in worst.items() if e > PRECISION_TOL}
    assert not bad, f"float32 vs float64 run differ beyond {PRECISION_TOL}: {bad}"
    return sorted(worst.items(), key=lambda kv: -kv[1])[:3]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def stored_tensors(case, base, grads, values):
    keep = (lambda n: True) if case["mode"] == "lora" else (lambda n: n in FULL_SELECTED)
    tensors = {}
    if case["objective"]["pair"] == "base-centroid":
        tensors["base.centroid"] = base.centroid
    tensors.update({f"grad.{n}": g for n, g in grads.items() if keep(n)})
    for k, step in enumerate(values, start=1):
        tensors.update({f"step{k}.{n}": v for n, v in step.items() if keep(n)})
    return {n: t.detach().to(torch.float32).contiguous() for n, t in tensors.items()}


def write_case(case, base, steps, tensors):
    meta = {"case": case["case"], "model": f"models/{case['model']}", "mode": case["mode"]}
    if case["mode"] == "lora":
        meta["lora"] = case["lora"]
    meta.update({
        "objective": case["objective"],
        "optimizer": case["optimizer"],
        "harmful": case["harmful"],
        "harmless": case["harmless"],
        "base": {"nu": base.nu.tolist(), "base_distance": base.base_distance.tolist(),
                 "margin": base.margin.tolist()},
        "steps": steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    })
    (OUT / f"{case['case']}.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file(tensors, OUT / f"{case['case']}.safetensors")


def run(case, model):
    """Base constants, then the training steps, on `model` (changed in place)."""
    base = Base(case, model)
    base.constants(case["harmful"], case["harmless"])
    steps, grads, values = train(case, model, base, case["harmful"], case["harmless"])
    return base, steps, grads, values


def make_case(case):
    g = torch.Generator().manual_seed(case["seed"])
    model = load_model(case["model"])
    vocab = model.config.vocab_size
    case["harmful"] = random_prompts(vocab, case["harmful_lengths"], g)
    case["harmless"] = random_prompts(vocab, case["harmless_lengths"], g)
    if case["mode"] == "lora":
        model = make_lora(model, case["lora"], g)
        save_adapter(model, OUT / f"{case['case']}.adapter")
        check_adapter_reloads(case, model)
    else:
        model.requires_grad_(True)
    model0 = copy.deepcopy(model)
    base, steps, grads, values = run(case, model)
    report = self_check(case, model0, base, steps, grads)
    tensors = stored_tensors(case, base, grads, values)
    report["f64"] = check_precision(case, model0, base, steps, tensors)
    write_case(case, base, steps, tensors)
    print_summary(case, base, steps, report)


def print_summary(case, base, steps, report):
    print(f"{case['case']}: {len(steps)} steps")
    print(f"  base: nu {fmt(base.nu)}  D(base) {fmt(base.base_distance)}  m {fmt(base.margin)}")
    for k, st in enumerate(steps, start=1):
        print(f"  step {k}: loss {st['loss']:.6f}  sep {st['sep']:.6f}  kl {st['kl']:.6f}  "
              f"D {fmt(st['distance'])}  grad_norm {st['grad_norm']:.6f}")
    worst = max(v for k, v in report.items() if k not in ("fd", "f64"))
    print(f"  plain-loop f64 vs batched f32 (step 1, constants): max rel {worst:.1e}")
    worst = ", ".join(f"{n} {e:.1e}" for n, e in report["f64"])
    print(f"  f32 run vs f64 run, worst stored numbers (rel): {worst}")
    for name, index, analytic, err in report["fd"]:
        print(f"  fd {name}{list(index)}: grad {analytic:.6e}  rel {err:.1e}")


def fmt(values):
    return "[" + ", ".join(f"{float(v):.6f}" for v in values) + "]"


def main():
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    check_kl_backward()
    for case in CASES:
        make_case(case)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT.relative_to(ROOT)}: {total / 1024:.0f} KiB")
    assert total < 2 * 1024 * 1024, "training fixtures exceed 2 MB"


if __name__ == "__main__":
    main()
