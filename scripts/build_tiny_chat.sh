#!/bin/sh
# Rebuilds models/tiny-chat from scratch (stories260K + the train splits in data/datasets),
# on whatever adapter es2-wgpu picks (lavapipe on a machine without a GPU). See
# scripts/tiny_chat_recipe.md for the recipe and models/tiny-chat/SOURCES.md for the result.
set -eu
cd "$(dirname "$0")/.."
exec cargo run --release --example build_tiny_chat -- --out models/tiny-chat "$@"
