#!/usr/bin/env python3
"""Checks one step of examples/shape_step.rs against torch + transformers + peft.

    .venv/bin/python scripts/check_shape_step.py DIR [--float32]

DIR is what the example wrote: model/ (a Hugging Face folder, bf16 weights), adapter/ (a PEFT
adapter), prompts.json (token ids and the objective's options), result.json (the engine's numbers)
and grads.safetensors (the engine's LoRA gradients). This loads the folder and the adapter with
transformers and peft, computes the same step-0 values with the ES2 objective of
make_training_fixtures.py (its Base, es2_loss and conventions: right padding, e_l =
hidden_states[l + 1], last-token pooling, centroid l2 distances over nu_l, hinge margins
3 x D_l(base), forward KL at temperature 1 over the real harmless positions), and prints each
value's relative error against result.json: |engine - torch| / |torch| for scalars, and
||engine - torch|| / ||torch|| for vectors (nu_l, D_l(base), m_l, D_l; also the largest
per-layer error) and for the LoRA gradients (all of them together, and the worst tensor).

The bf16 weights are widened exactly; torch computes in float64 by default (SDPA attention and a
float64 RMSNorm, make_training_fixtures.to_float64), or in float32 with --float32 (eager
attention, transformers as shipped). Exits 1 when a step-0 value (loss, L_sep, L_KL, every D_l,
nu_l, D_l(base), m_l, the pre-clip gradient norm, the gradients as a whole) is off by more than
1e-4. Writes DIR/check.json with every error. Run by hand, not in CI.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_training_fixtures as fx  # noqa: E402

TOL = 1e-4


def rel(got, want):
    got = torch.as_tensor(got, dtype=torch.float64).flatten()
    want = torch.as_tensor(want, dtype=torch.float64).flatten()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def worst_entry(got, want):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    return float(((got - want).abs() / want.abs().clamp_min(1e-300)).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--float32", action="store_true", help="compute in float32, not float64")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    spec = json.loads((args.dir / "prompts.json").read_text())
    result = json.loads((args.dir / "result.json").read_text())
    dtype = torch.float32 if args.float32 else torch.float64
    config = json.loads((args.dir / "model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16", "the folder should declare bf16 weights"
    with safe_open(args.dir / "model" / "model.safetensors", framework="pt") as f:
        stored = {f.get_slice(n).get_dtype() for n in f.keys()}
    assert stored == {"BF16"}, f"model.safetensors holds {stored}, not only bf16"
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        str(args.dir / "model"), dtype=dtype, attn_implementation="eager"
    ).eval()
    model = PeftModel.from_pretrained(model, str(args.dir / "adapter"), is_trainable=True)
    if dtype == torch.float64:
        fx.to_float64(model)
    else:
        model = model.to(torch.float32)
    load_s = time.time() - started

    case = {"mode": "lora", "objective": spec["objective"]}
    harmful, harmless = spec["harmful"], spec["harmless"]
    started = time.time()
    base = fx.Base(case, model)
    base.constants(harmful, harmless)
    loss, sep, kl, D = fx.es2_loss(model, base, harmful, harmless)
    loss.backward()
    named = fx.trainable(model, case)
    grad_norm = fx.total_grad_norm([p for _, p in named], 0.0)
    step_s = time.time() - started

    engine_grads = load_file(args.dir / "grads.safetensors")
    torch_grads = {n: p.grad.detach() for n, p in named}
    assert set(engine_grads) == set(torch_grads), (
        f"gradient names differ: {sorted(set(engine_grads) ^ set(torch_grads))[:4]}")
    names = sorted(torch_grads)
    flat_engine = torch.cat([engine_grads[n].double().flatten() for n in names])
    flat_torch = torch.cat([torch_grads[n].double().flatten() for n in names])
    per_tensor = {n: rel(engine_grads[n], torch_grads[n]) for n in names}
    worst_tensor = max(per_tensor, key=per_tensor.get)

    got, step = result["base"], result["step0"]
    rows = [
        # (what, engine, torch, error, gated)
        ("loss", step["loss"], loss.item(), rel(step["loss"], loss.item()), True),
        ("L_sep", step["sep"], sep.item(), rel(step["sep"], sep.item()), True),
        ("L_KL", step["kl"], kl.item(), rel(step["kl"], kl.item()), True),
        ("D_l (norm)", None, None, rel(step["distance"], D.detach()), True),
        ("D_l (worst layer)", None, None, worst_entry(step["distance"], D.detach()), True),
        ("nu_l", None, None, rel(got["nu"], base.nu), True),
        ("nu_l (worst layer)", None, None, worst_entry(got["nu"], base.nu), True),
        ("D_l(base)", None, None, rel(got["base_distance"], base.base_distance), True),
        ("D_l(base) (worst layer)", None, None,
         worst_entry(got["base_distance"], base.base_distance), True),
        ("m_l", None, None, rel(got["margin"], base.margin), True),
        ("grad norm (pre-clip)", step["grad_norm"], grad_norm, rel(step["grad_norm"], grad_norm),
         True),
        ("LoRA gradients (all)", None, None, rel(flat_engine, flat_torch), True),
        (f"LoRA gradient, worst tensor ({worst_tensor})", None, None, per_tensor[worst_tensor],
         False),
    ]
    print(f"{spec['shape']}: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"compute {str(dtype).removeprefix('torch.')}; load {load_s:.1f} s, step {step_s:.1f} s")
    print(f"  hinge active on {int((D.detach() < base.margin).sum())} of {len(D)} layers; "
          f"L_KL {kl.item():.6g}")
    bad = []
    for what, engine, ref, err, gated in rows:
        values = f"  engine {engine:.8g}  torch {ref:.8g}" if engine is not None else ""
        flag = "" if err <= TOL or not gated else "  > 1e-4"
        print(f"  {what:<40} rel {err:.2e}{values}{flag}")
        if gated and err > TOL:
            bad.append(what)
    check = {
        "compute": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "torch": {"loss": loss.item(), "sep": sep.item(), "kl": kl.item(),
                  "distance": D.detach().tolist(), "grad_norm": grad_norm, "nu": base.nu.tolist(),
                  "base_distance": base.base_distance.tolist(), "margin": base.margin.tolist()},
        "rel_errors": {what: err for what, _, _, err, _ in rows},
        "seconds": {"load": load_s, "step": step_s},
        "pass": not bad,
    }
    (args.dir / "check.json").write_text(json.dumps(check, indent=1) + "\n")
    if bad:
        print(f"FAIL: {', '.join(bad)} off by more than {TOL}")
        sys.exit(1)
    print(f"ok: every step-0 value within {TOL}")


if __name__ == "__main__":
    main()
