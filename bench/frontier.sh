#!/usr/bin/env bash
# Issue 32's frontier across recipes: every llama.cpp file (`adadim bench llamacpp`, every type
# with and without an importance matrix) against the best of our 3-seed models at no more bits,
# from the runs bench/ablation.sh and bench/budget.sh left in RUNS (each folder made by the
# command its RESULTS.md section names); tabulated into RESULTS.md's "frontier" section by
# bench/frontier_table.py, drawn into docs/frontier-best.svg.
# Usage: ADADIM_DATA=../shared/data bench/frontier.sh
# Knobs (env): RUNS ("results/calib-bpw results/calib-w3 results/calib-w4"), LLAMA_OUT
# (results/llamacpp), WINDOWS (8), ADADIM_BIN, LLAMA_BIN (a llama.cpp build; default: built once
# from the PyPI sdist by bench/peers/build-llamacpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
RUNS="${RUNS:-results/calib-bpw results/calib-w3 results/calib-w4}"
LLAMA_OUT="${LLAMA_OUT:-results/llamacpp}"; WINDOWS="${WINDOWS:-8}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
LLAMA_BIN="${LLAMA_BIN:-$(bench/peers/build-llamacpp.sh | tail -n 1)}"
# Files and perplexities are cached in LLAMA_OUT by what they were made from: a rerun only tabulates.
$A bench llamacpp --llamacpp "$LLAMA_BIN" --out "$LLAMA_OUT" --windows "$WINDOWS" > /dev/null
# shellcheck disable=SC2086 # RUNS holds several folders
python3 bench/frontier_table.py "$LLAMA_OUT" RESULTS.md "$LLAMA_OUT/ours-best.json" $RUNS
$A bench llamacpp --llamacpp "$LLAMA_BIN" --out "$LLAMA_OUT" --windows "$WINDOWS" --ours "$LLAMA_OUT/ours-best.json" --svg docs/frontier-best.svg > /dev/null
