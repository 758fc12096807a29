#!/usr/bin/env bash
# Regenerate BENCHMARKS.md: builds adadim and the llama.cpp peer (once), then runs every
# benchmark side by side on this machine. Usage: ADADIM_DATA=../shared/data bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
cargo build --release -p adadim
LLAMA_BIN="$(bench/peers/build-llamacpp.sh | tail -n 1)"
./target/release/adadim bench eval --model smollm2 --dataset wikitext2 --windows 8 --llama-cpp "$LLAMA_BIN" --write BENCHMARKS.md
