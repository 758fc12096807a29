#!/usr/bin/env bash
# Regenerate BENCHMARKS.md: builds adadim and the llama.cpp peer (once), then runs every
# benchmark side by side on this machine. Usage: ADADIM_DATA=../shared/data bench/run.sh
# Takes about 90 minutes on 2 cores (quantization with 128 x 2048 calibration tokens: ~22 min;
# the scale benchmark writes ~2.5 GB of synthetic checkpoints under $SCALE_DIR and quantizes
# one block of each large shape: ~15 min). Set SKIP_SCALE=1 to leave it out.
# QUANT_NSAMPLES / QUANT_SEQLEN shrink the quantization benchmark for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
ADADIM_HOME="${ADADIM_HOME:-$HOME/.cache/adadim}"
cargo build --release -p adadim
A=./target/release/adadim
LLAMA_BIN="$(bench/peers/build-llamacpp.sh | tail -n 1)"

$A bench eval --model smollm2 --dataset wikitext2 --windows 8 --llama-cpp "$LLAMA_BIN" --write BENCHMARKS.md
$A bench kernels --llamacpp "$LLAMA_BIN" --write BENCHMARKS.md

# Decode: our f32 and packed SmolLM2 (RTN-ada, 32 x 512 calibration; uniform w4g128 and w3g128,
# and a --bpw 3.5 model whose layouts mix bits, groups and axes, set against the uniform ones)
# against llama.cpp's Q4_0 and Q4_K_M of the same GGUF (requantized from the shipped Q4_1: the
# only source there is).
RUNS="$ADADIM_HOME/bench/decode"
mkdir -p "$RUNS"
for b in 4 3; do
    [[ -d "$RUNS/w${b}g128" ]] || $A quantize --model smollm2 --method rtn --dim ada --bits "$b" --group 128 \
        --nsamples 32 --calib-seqlen 512 --out "$RUNS/w${b}g128"
done
[[ -d "$RUNS/bpw3.5" ]] || $A quantize --model smollm2 --method rtn --dim ada --bpw 3.5 \
    --nsamples 32 --calib-seqlen 512 --out "$RUNS/bpw3.5"
GGUF="$ADADIM_HOME/models/smollm2.gguf"   # fetched with smollm2 by the eval benchmark above
for t in Q4_0 Q4_K_M; do
    [[ -f "$RUNS/smollm2-$t.gguf" ]] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$GGUF" "$RUNS/smollm2-$t.gguf" "$t" 2
done
$A bench decode --models "smollm2,$RUNS/w4g128,$RUNS/bpw3.5,$RUNS/w3g128" \
    --gguf "$RUNS/smollm2-Q4_0.gguf,$RUNS/smollm2-Q4_K_M.gguf" --llamacpp "$LLAMA_BIN" --write BENCHMARKS.md

# The default quantization (GPTQ-ada w3g128 with its default settings), as a user runs it.
$A bench quantize --model smollm2 --bits 3 --group 128 \
    --nsamples "${QUANT_NSAMPLES:-128}" --calib-seqlen "${QUANT_SEQLEN:-512}" --write BENCHMARKS.md

# Scale: synthetic checkpoints of real shapes (f16), quantized in their own processes.
if [[ "${SKIP_SCALE:-0}" != 1 ]]; then
    SCALE_DIR="${SCALE_DIR:-$ADADIM_HOME/scale}"
    mkdir -p "$SCALE_DIR"
    [[ -d "$SCALE_DIR/smollm2" ]] || $A synth --shape smollm2 --out "$SCALE_DIR/smollm2"
    # One block of each large shape: per-block time and peak memory (a full 32-block 7B run
    # takes over 2 hours here).
    [[ -d "$SCALE_DIR/llama2-7b-1l" ]] || $A synth --shape llama2-7b --layers 1 --out "$SCALE_DIR/llama2-7b-1l"
    [[ -d "$SCALE_DIR/llama2-13b-1l" ]] || $A synth --shape llama2-13b --layers 1 --out "$SCALE_DIR/llama2-13b-1l"
    $A bench scale --models "$SCALE_DIR/smollm2,$SCALE_DIR/llama2-7b-1l,$SCALE_DIR/llama2-13b-1l" \
        --scratch "$SCALE_DIR" --write BENCHMARKS.md
fi
