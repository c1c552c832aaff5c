#!/usr/bin/env bash
# One ES2 LoRA step with bf16 frozen weights and recomputation at each large shape
# (examples/shape_step.rs), checked against torch + transformers + peft
# (scripts/check_shape_step.py), and one table at the end: parameters, tokens, step time,
# measured GPU peak against the memory plan, and each step-0 value's relative error.
# A long run for by hand (minutes per shape on lavapipe), not CI.
#
#   scripts/shape_steps.sh [SHAPE ...]      # default: qwen2.5-0.5b llama-3-1b
#
# PYTHON (default: python3) must have torch, transformers, peft and safetensors.
# OUT (default: target/shape-steps) receives one folder per shape, model weights included
# (about 1 GB for the 0.5B shape, 3 GB for the 1B one); it is under target/, out of git.
# BATCH and MAX_LEN (default 2 and 64) set the prompts per side and their longest length.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-target/shape-steps}
BATCH=${BATCH:-2}
MAX_LEN=${MAX_LEN:-64}
# GNU time, where there is one, adds the wall time and the host memory of each run.
timer=()
[ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(qwen2.5-0.5b llama-3-1b)

mkdir -p "$OUT"
cargo build --release --example shape_step
cargo run --release --quiet -- info
bin="${CARGO_TARGET_DIR:-target}/release/examples/shape_step"
for shape in "${shapes[@]}"; do
    dir="$OUT/$shape"
    echo "== $shape: $bin --shape $shape --out $dir --batch $BATCH --max-len $MAX_LEN"
    "${timer[@]}" "$bin" --shape "$shape" --out "$dir" \
        --batch "$BATCH" --max-len "$MAX_LEN" 2> "$dir.time" || { cat "$dir.time"; exit 1; }
    grep -E "Maximum resident|Elapsed" "$dir.time" || true
    echo "== $shape: $PYTHON scripts/check_shape_step.py $dir"
    "$PYTHON" scripts/check_shape_step.py "$dir"
done

"$PYTHON" - "$OUT" "${shapes[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, shapes = Path(sys.argv[1]), sys.argv[2:]
keys = ["loss", "L_sep", "L_KL", "D_l (worst layer)", "nu_l (worst layer)",
        "D_l(base) (worst layer)", "m_l", "grad norm (pre-clip)", "LoRA gradients (all)"]
print()
print("| shape | parameters | tokens | step | peak | plan | plan vs peak | compute | "
      + " | ".join(keys) + " |")
print("|---" * (8 + len(keys)) + "|")
for shape in shapes:
    r = json.loads((out / shape / "result.json").read_text())
    c = json.loads((out / shape / "check.json").read_text())
    m = r["memory"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    errors = " | ".join(f"{c['rel_errors'][k]:.1e}" for k in keys)
    print(f"| {shape} | {r['parameters'] / 1e9:.3f} B | {r['batch']} + {r['batch']}, "
          f"{r['tokens']} | {r['seconds']['step']:.1f} s | {mib(m['peak_bytes'])} | "
          f"{mib(m['planned_bytes'])} | {100 * (m['planned_over_measured'] - 1):+.2f}% | "
          f"{c['compute']} | {errors} |")
    if abs(m["planned_over_measured"] - 1) > 0.10:
        print(f"{shape}: the plan is off by more than 10%: see {out / shape / 'result.json'}")
EOF
