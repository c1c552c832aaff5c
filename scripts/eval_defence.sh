#!/bin/sh
# The defence measured with long budgets: harden MODEL with the default `es2-wgpu train`, then
# evaluate the hardened model against MODEL on the same prompts, with more prompts, a wider RepE
# sweep, a longer soft-prompt optimisation and GCG's own budgets (20 tokens, top-k 256, 512
# candidates, 500 steps). Hours on a CPU driver; minutes to hours on a GPU, by model size.
# Writes OUT/es2-out (the adapter) and OUT/eval (report.md, report.json, plots). Extra
# arguments go to `eval`: flags not set here, e.g. --attacks direct,scav,repe or --mmlu FILE.
#
#     scripts/eval_defence.sh MODEL [OUT] [EVAL ARGS...]
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 MODEL [OUT] [EVAL ARGS...]" >&2
    exit 2
fi
model="$1"
out="${2:-eval-defence}"
shift
[ $# -gt 0 ] && shift
manifest="$(dirname "$0")/../Cargo.toml"
es2() { cargo run --release --quiet --manifest-path "$manifest" -- "$@"; }
es2 train --model "$model" --out "$out/es2-out" --overwrite
es2 eval --model "$model" --lora "$out/es2-out" --base "$model" \
    --answered 64 --probe-prompts 200 --max-new-tokens 256 \
    --repe-c 0.25,0.5,1,2,4,8 --soft-prompt-steps 500 \
    --gcg-suffix 20 --gcg-top-k 256 --gcg-candidates 512 --gcg-steps 500 --gcg-batch 64 \
    --out "$out/eval" "$@"
