#!/bin/sh
# The benchmarks to run whenever a GPU is at hand (BENCHMARKS.md records each run): builds
# es2-wgpu in release, names the adapter (`es2-wgpu info`), runs the criterion kernel
# benchmarks, then `es2-wgpu bench`: the plain LM step at the peers' tiny Llama shape, the ES2
# step there and at Qwen2.5-0.5B's shape (LoRA), GEMM at 1024³ and at the 0.5B step's
# products, and, on an adapter that is not a CPU, an ES2 LoRA step at a 7B-class shape
# (mistral-7b, f16 frozen weights, about 15 GB). Ends with one table of every `bench` run.
# About 5-8 minutes on a GPU with a cold build.
#
#   scripts/gpu-bench.sh                     # everything
#   ES2_BENCH_QUICK=1 scripts/gpu-bench.sh   # shrunk (a few minutes on lavapipe, warm build):
#                                            # one step each, no profiled step, the 0.5B step at
#                                            # 16 tokens, criterion's smoke run, no 7B shape
#   ES2_BENCH_7B=0 scripts/gpu-bench.sh      # leave the 7B-class shape out (1 forces it in)
#
# Every output (the JSON of each run, criterion's log) stays in $ES2_BENCH_OUT
# (default: target/gpu-bench/). ES2_ADAPTER / ES2_BACKEND choose the adapter as for the CLI.
set -eu
cd "$(dirname "$0")/.."
out=${ES2_BENCH_OUT:-target/gpu-bench}
quick=${ES2_BENCH_QUICK:-0}
mkdir -p "$out"
started=$(date +%s)

echo "== build (release)"
cargo build --release --bin es2-wgpu
es2=${CARGO_TARGET_DIR:-target}/release/es2-wgpu

echo "== es2-wgpu info"
"$es2" info | tee "$out/info.txt"
"$es2" info --json > "$out/info.json"
# The chosen adapter's device type: the 7B-class shape runs only on a real GPU.
chosen=$(sed -n 's/^  "chosen": \([0-9]*\).*/\1/p' "$out/info.json")
device_type=$(sed -n 's/^      "device_type": "\(.*\)",/\1/p' "$out/info.json" | sed -n "$((chosen + 1))p")

echo "== criterion kernels (cargo bench --bench kernels)"
if [ "$quick" = 1 ]; then
    # Each benchmark once, no statistics: proves they run.
    cargo test --release --bench kernels 2>&1 | tee "$out/criterion.txt"
else
    cargo bench --bench kernels -- --warm-up-time 1 --measurement-time 2 2>&1 |
        tee "$out/criterion.txt"
fi

if [ "$quick" = 1 ]; then
    common="--steps 1 --no-profile"
    small_seq="--seq-len 16"
else
    common="--steps 3"
    small_seq=""
fi
big=${ES2_BENCH_7B:-auto}
if [ "$big" = auto ]; then
    big=0
    if [ "$quick" != 1 ] && [ "$device_type" != Cpu ]; then big=1; fi
fi

runs=""
bench() {
    name=$1
    shift
    echo "== es2-wgpu bench $*"
    # shellcheck disable=SC2086 # $common holds several flags
    "$es2" bench "$@" $common --json > "$out/$name.json"
    runs="$runs $name"
}
bench lm-step lm-step
bench es2-step es2-step
# shellcheck disable=SC2086
bench es2-step-0.5b es2-step --shape qwen2.5-0.5b $small_seq
if [ "$quick" = 1 ]; then
    bench gemm gemm 256 256 256
else
    bench gemm gemm
fi
if [ "$big" = 1 ]; then
    bench es2-step-7b es2-step --shape mistral-7b
fi

# One table of every run, read from the pretty-printed JSON: a step's times and the GEMM
# family's rate in its profiled step; each product of a gemm run (At: A stored transposed).
echo
echo "== es2-wgpu bench on $(sed -n 's/^  "adapter": "\(.*\)",/\1/p' "$out/lm-step.json"), $(date -u +%Y-%m-%d)"
printf '%-10s %-36s %10s %10s %10s %8s\n' workload what "first ms" "median ms" "tokens/s" GFLOP/s
for name in $runs; do
    awk '
        function val(line) { sub(/^[^:]*: /, "", line); sub(/,$/, "", line); gsub(/"/, "", line); return line }
        function row(w, what, first, ms, rate, gf) {
            printf "%-10s %-36s %10.2f %10.2f %10s %8s\n", w, what, first, ms, rate, gf
        }
        /^  "workload":/ { w = val($0) }
        /^  "shape":/ { s = val($0) }
        /^  "trainable":/ { tr = val($0) }
        /^  "tokens_per_step":/ { tok = val($0) }
        /^  "first_step_ms":/ { f = val($0) }
        /^  "median_step_ms":/ { m = val($0) }
        /^  "tokens_per_s":/ { t = val($0) }
        /^      "family": "matmul"/ { in_matmul = 1 }
        /^      "gflops":/ && in_matmul { g = val($0); in_matmul = 0 }
        /^      "label":/ { label = val($0) }
        /^      "m":/ { M = val($0) }
        /^      "n":/ { N = val($0) }
        /^      "k":/ { K = val($0) }
        /^      "transpose_a":/ { ta = val($0) == "true" ? "At" : "A" }
        /^      "transpose_b":/ { tb = val($0) == "true" ? "Bt" : "B" }
        /^      "first_ms":/ && label != "" { gf = val($0) }
        /^      "ms":/ && label != "" { gms = val($0) }
        /^      "gflops":/ && label != "" {
            row("gemm", label " " M "x" N "x" K " " ta "." tb, gf, gms, "-", sprintf("%.2f", val($0)))
            label = ""
        }
        END {
            if (w != "gemm")
                row(w, s " " tr " " tok " tokens", f, m, sprintf("%.1f", t), (g == "" ? "-" : sprintf("%.2f", g)))
        }' "$out/$name.json"
done
echo "(step times: wall clock, median of the timed steps; GEMM rates: timestamp queries where the"
echo " adapter has them. JSON and criterion's log in $out/; $(($(date +%s) - started)) s in all.)"
