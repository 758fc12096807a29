#!/usr/bin/env bash
# Issue 34's sweep on all-MiniLM-L6-v2, the one genuinely float model: each method and layout
# quantized with every calibration seed (RTN per-OC / per-IC use no calibration: seed 0 only),
# evaluated by `eval embed` against the float model (WikiText-2 test sentences of at most 128
# tokens: 1,000 queries against 8,000; the split has 9,493 such sentences), then tabulated into RESULTS.md's BERT section
# (bench/bert_table.py).
# Usage: ADADIM_DATA=../shared/data bench/bert.sh
# Knobs (env): CONFIGS ("8:128 4:128 4:64 3:128 3:64"), METHODS (below; a `-qep` suffix adds
# `--qep QEP`, e.g. gptq-ada-qep), QEP (0.5), BUDGETS ("4.0 3.25": `--bpw` runs), SEEDS ("0 1 2"),
# NSAMPLES (128), CALIB_SEQLEN (256), QUERIES (1000), CORPUS (8000), OUT (results/bert),
# ADADIM_BIN and ADADIM_COMMIT (the commit that binary was built from, recorded per run).
# Finished runs in OUT are reused; quantized models are deleted once evaluated.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
CONFIGS="${CONFIGS:-8:128 4:128 4:64 3:128 3:64}"; SEEDS="${SEEDS:-0 1 2}"
METHODS="${METHODS:-rtn-oc rtn-ic rtn-ada gptq-oc gptq-ic gptq-ada}"
NSAMPLES="${NSAMPLES:-128}"; CALIB_SEQLEN="${CALIB_SEQLEN:-256}"
QUERIES="${QUERIES:-1000}"; CORPUS="${CORPUS:-8000}"; OUT="${OUT:-results/bert}"; QEP="${QEP:-0.5}"
BUDGETS="${BUDGETS-4.0 3.25}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
mkdir -p "$OUT"
measure() { # RUN QUANTIZE-ARGS...: quantize into RUN (unless there), keep its report, evaluate, delete it
  local run=$1; shift
  [ -f "$run.embed.json" ] && return
  [ -d "$run" ] || $A quantize --model minilm --nsamples "$NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" "$@" \
    --out "$run" --json > "$run.quantize.json"
  cp "$run/report.json" "$run.report.json"
  echo "${ADADIM_COMMIT:-$(git rev-parse --short HEAD)}" > "$run.commit"
  $A eval embed --model "$run" --queries "$QUERIES" --corpus "$CORPUS" --json > "$run.embed.json.tmp"
  mv "$run.embed.json.tmp" "$run.embed.json"
  rm -rf "$run"
}
for cfg in $CONFIGS; do
  bits=${cfg%%:*}; group=${cfg##*:}
  for m in $METHODS; do
    seeds=$SEEDS; base=${m%-qep}; extra=()
    case $m in rtn-oc|rtn-ic) seeds=0 ;; esac
    [ "$base" != "$m" ] && extra=(--qep "$QEP")
    for seed in $seeds; do
      measure "$OUT/w${bits}g${group}-$m-s$seed" --method "${base%%-*}" --dim "${base##*-}" --bits "$bits" \
        --group "$group" --seed "$seed" "${extra[@]}"
    done
  done
done
# --bpw: GPTQ-ada with each linear's bits, group and axis chosen under the budget.
for b in $BUDGETS; do
  for seed in $SEEDS; do
    measure "$OUT/bpw$b-gptq-ada-s$seed" --method gptq --dim ada --bpw "$b" --seed "$seed"
  done
done
python3 bench/bert_table.py "$OUT" RESULTS.md
