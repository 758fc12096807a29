#!/usr/bin/env bash
# Regenerate BENCHMARKS.md: builds adadim and the llama.cpp peer (once), then runs every
# benchmark side by side on this machine. Usage: ADADIM_DATA=../shared/data bench/run.sh
# Takes about 35 minutes on 2 cores (quantization with 128 x 2048 calibration tokens: ~22 min).
# QUANT_NSAMPLES / QUANT_SEQLEN shrink the quantization benchmark for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
cargo build --release -p adadim
LLAMA_BIN="$(bench/peers/build-llamacpp.sh | tail -n 1)"
./target/release/adadim bench eval --model smollm2 --dataset wikitext2 --windows 8 --llama-cpp "$LLAMA_BIN" --write BENCHMARKS.md
./target/release/adadim bench kernels --write BENCHMARKS.md
./target/release/adadim bench quantize --model smollm2 --method gptq --dim ada --bits 3 --group 128 \
    --nsamples "${QUANT_NSAMPLES:-128}" --calib-seqlen "${QUANT_SEQLEN:-2048}" --write BENCHMARKS.md
