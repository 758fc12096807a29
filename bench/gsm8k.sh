#!/usr/bin/env bash
# Issue 35 (RESULTS.md "GSM8K and task-specific calibration"): GSM8K of FP and of the w3g128 /
# w4g128 methods, and the paper's Table 4 shape: MMLU, HumanEval and GSM8K of GPTQ-ada w3g128
# calibrated on Shakespeare (the default), code and GSM8K's train split. Writes JSON into OUT
# (finished steps reused) and the section via bench/gsm8k_table.py.
# Usage: ADADIM_DATA=../shared/data bench/gsm8k.sh
# Knobs (env): MODEL (smollm2), GSM8K_LIMIT (first N test problems for the quantized models:
# 100; empty = all 1319), FP_LIMIT (FP's: 300), MMLU_LIMIT (10 per subject), HE_LIMIT (first 20
# problems; empty = all 164), NSAMPLES (32 x 512 calibration, seed 0, as
# bench/tasks.sh), OUT (results/gsm8k), EVAL_THREADS (threads of the evaluations; 1 leaves a
# core to a quantize running beside them), ADADIM_BIN, ADADIM_COMMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="${MODEL:-smollm2}"; GSM8K_LIMIT="${GSM8K_LIMIT-100}"; FP_LIMIT="${FP_LIMIT-300}"
MMLU_LIMIT="${MMLU_LIMIT:-10}"; HE_LIMIT="${HE_LIMIT-20}"; NSAMPLES="${NSAMPLES:-32}"; OUT="${OUT:-results/gsm8k}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
E() { if [ -n "${EVAL_THREADS:-}" ]; then RAYON_NUM_THREADS="$EVAL_THREADS" "$A" "$@"; else "$A" "$@"; fi; }
mkdir -p "$OUT"
[ -f "$OUT/COMMIT" ] || echo "${ADADIM_COMMIT:-$(git rev-parse --short HEAD)}" > "$OUT/COMMIT"
gl=(); [ -n "$GSM8K_LIMIT" ] && gl=(--limit "$GSM8K_LIMIT")
hl=(); [ -n "$HE_LIMIT" ] && hl=(--limit "$HE_LIMIT")
once() { # json file, command...: run once, keep the JSON only when the command succeeded
  local f=$1; shift
  [ -f "$f" ] || { "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }
}
# The paper's methods as bench/tasks.sh pins them (min-max groups, stored column order).
declare -A ARGS=(
  [rtn-oc]="--method rtn --dim oc --scale-search minmax"
  [rtn-ada]="--method rtn --dim ada --scale-search minmax"
  [gptq-oc]="--method gptq --dim oc --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada]="--method gptq --dim ada --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
)
model() { # name bits method calib -> the model directory, quantized if missing
  local d="$OUT/$1"
  # shellcheck disable=SC2086 # ARGS holds several flags
  [ -d "$d" ] || $A quantize --model "$MODEL" ${ARGS[$3]} --bits "$2" --group 128 --calib "$4" \
    --nsamples "$NSAMPLES" --calib-seqlen 512 --seed 0 --out "$d" --json > "$OUT/quantize-$1.json"
  echo "$d"
}
gsm() { once "$OUT/gsm8k-$1.json" E eval gsm8k --model "$2" "${gl[@]}" --json; }
# FP and Table 4's three calibrations first, then their MMLU / HumanEval, then the other methods.
once "$OUT/gsm8k-fp.json" E eval gsm8k --model "$MODEL" ${FP_LIMIT:+--limit "$FP_LIMIT"} --json
for c in shakespeare code gsm8k; do gsm "w3g128-gptq-ada-$c" "$(model "w3g128-gptq-ada-$c" 3 gptq-ada "$c")"; done
for c in shakespeare code gsm8k; do
  d="$OUT/w3g128-gptq-ada-$c"
  once "$OUT/mmlu-w3g128-gptq-ada-$c.json" E eval mmlu --model "$d" --limit "$MMLU_LIMIT" --json
  once "$OUT/humaneval-w3g128-gptq-ada-$c.json" E eval humaneval --model "$d" "${hl[@]}" --json
done
once "$OUT/mmlu-fp.json" E eval mmlu --model "$MODEL" --limit "$MMLU_LIMIT" --json
once "$OUT/humaneval-fp.json" E eval humaneval --model "$MODEL" "${hl[@]}" --json
for v in rtn-oc rtn-ada gptq-oc; do gsm "w3g128-$v" "$(model "w3g128-$v" 3 "$v" shakespeare)"; done
for v in rtn-oc rtn-ada gptq-oc gptq-ada; do gsm "w4g128-$v" "$(model "w4g128-$v" 4 "$v" shakespeare)"; done
python3 bench/gsm8k_table.py "$OUT" RESULTS.md
