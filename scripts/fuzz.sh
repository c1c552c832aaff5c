#!/bin/sh
# A longer fuzzing campaign than the one `cargo test` runs: N mutated inputs per target
# (safetensors header reader, config.json, datasets, adapters; default 20000) from seed SEED
# (default 1). See tests/model/fuzz.rs. A crash fails the run and keeps its input in the temp
# folder.
#
#     scripts/fuzz.sh [N] [SEED]
set -eu
cd "$(dirname "$0")/.."
ES2_FUZZ_ITERS="${1:-20000}" ES2_FUZZ_SEED="${2:-1}" \
    exec cargo test --test model fuzz -- --nocapture --test-threads 1
