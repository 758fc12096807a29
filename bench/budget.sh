#!/usr/bin/env bash
# Issue 32's frontier: `adadim quantize --bpw B` at each budget with 3 calibration seeds,
# evaluated on WikiText-2 and PTB (first WINDOWS windows of 2048) beside every llama.cpp type
# (`adadim bench llamacpp`), then tabulated with the damage-model study and the per-module
# allocation into RESULTS.md's "Size budget" section (bench/budget_table.py); seed 0's
# allocations drawn into docs/allocation-bpw*.svg, the frontier into docs/frontier.svg.
# Usage: ADADIM_DATA=../shared/data bench/budget.sh
# `-fmin`: each layout may also take float minima (--float-min); `-rot`: the model rotated first
# (--rotate 0); `-mix`: calibrated on the Shakespeare + GSM8K-train mix (--calib mix).
# Knobs (env): MODEL (smollm2), BUDGETS ("3.25 4.0"), VARIANTS (names below), DAMAGES
# ("kl"; the study: "kl stream relative output"), SEEDS ("0 1 2"), NSAMPLES (128),
# CALIB_SEQLEN (512), WINDOWS (8), OUT (results/budget), ADADIM_BIN and ADADIM_COMMIT, LLAMA_BIN,
# SECTION (set: the runs are tabulated into that RESULTS.md section by bench/ablation_table.py,
# beside one another, and the frontier with llama.cpp is left as it is).
# Finished runs in OUT are reused; quantized models are deleted once evaluated (their
# report.json is kept). Runs of one seed share one damage table (ADADIM_HOME/damage-tables).
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="${MODEL:-smollm2}"; BUDGETS="${BUDGETS:-3.25 4.0}"; SEEDS="${SEEDS:-0 1 2}"
DAMAGES="${DAMAGES:-kl}"; NSAMPLES="${NSAMPLES:-128}"; CALIB_SEQLEN="${CALIB_SEQLEN:-512}"
WINDOWS="${WINDOWS:-8}"; OUT="${OUT:-results/budget}"
declare -A ARGS=(
  [rtn-ada]="--method rtn --dim ada --zero awq"
  [gptq-ada]="--method gptq --dim ada --act-order false --static-groups false --zero awq --percdamp 0.01 --qep 0"
  [gptq-ada-act]="--method gptq --dim ada --act-order --static-groups --zero awq --percdamp 0.01 --qep 0"
  [gptq-ada-act-fmin]="--method gptq --dim ada --act-order --static-groups --zero awq --float-min --percdamp 0.01 --qep 0"
  [gptq-ada-act-mix]="--method gptq --dim ada --act-order --static-groups --zero awq --calib mix --percdamp 0.01 --qep 0"
  [gptq-ada-act-mix-damp10]="--method gptq --dim ada --act-order --static-groups --zero awq --calib mix --percdamp 0.1 --qep 0"
  [gptq-ada-act-mix-damp10-qep05]="--method gptq --dim ada --act-order --static-groups --zero awq --calib mix --percdamp 0.1 --qep 0.5"
  [gptq-ada-act-fmin-mix-damp10-qep05]="--method gptq --dim ada --act-order --static-groups --zero awq --float-min --calib mix --percdamp 0.1 --qep 0.5"
  [gptq-ada-act-mix-damp10-qep05-rot]="--method gptq --dim ada --act-order --static-groups --zero awq --calib mix --percdamp 0.1 --qep 0.5 --rotate 0"
  [gptq-ada-act-mix-damp10-qep075]="--method gptq --dim ada --act-order --static-groups --zero awq --calib mix --percdamp 0.1 --qep 0.75"
)
VARIANTS="${VARIANTS:-gptq-ada}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
mkdir -p "$OUT"
. bench/quality_runs.sh
draw() { # seed 0's allocation under the default damage model, into docs/, from the saved report
  local run=$1 page
  if [ "$seed" = "${PICTURE_SEED:-0}" ] && [ "$dmg" = kl ] && [ -f "$run.report.json" ] && [ "$NSAMPLES" = 128 ]; then
    page=$(mktemp -d); cp "$run.report.json" "$page/report.json"
    $A report "$page" --out "$page/page" --no-updates > /dev/null
    cp "$page/page/allocation.svg" "docs/allocation-bpw$b-$v.svg"; rm -rf "$page"
  fi
}
for ds in wikitext2 ptb; do eval_to "$MODEL" "$ds" "$OUT/fp.$ds.json"; done
for b in $BUDGETS; do
  for v in $VARIANTS; do
    for dmg in $DAMAGES; do
      for seed in $SEEDS; do
        # shellcheck disable=SC2086 # ARGS holds several flags
        quantize_and_eval "$OUT/bpw$b-$v-$dmg-n$NSAMPLES-s$seed" ${ARGS[$v]} --bpw "$b" --damage "$dmg" --seed "$seed"
        draw "$OUT/bpw$b-$v-$dmg-n$NSAMPLES-s$seed"
      done
    done
  done
done
if [ -n "${SECTION:-}" ]; then
  [ -f "$OUT/COMMIT" ] || git rev-parse --short HEAD > "$OUT/COMMIT"
  python3 bench/ablation_table.py "$OUT" RESULTS.md "$SECTION"
  exit 0
fi
# llama.cpp's every type, with and without an importance matrix, through our evaluator on the same
# texts (built once from the PyPI sdist; LLAMA_BIN=DIR uses an existing build); then the table,
# which writes our points ($OUT/ours.json), and the frontier drawn from both (cached, no re-run).
LLAMA_BIN="${LLAMA_BIN:-$(bench/peers/build-llamacpp.sh | tail -n 1)}"
$A bench llamacpp --llamacpp "$LLAMA_BIN" --out "$OUT/llamacpp" --windows "$WINDOWS" > /dev/null
python3 bench/budget_table.py "$OUT" RESULTS.md
$A bench llamacpp --llamacpp "$LLAMA_BIN" --out "$OUT/llamacpp" --windows "$WINDOWS" --ours "$OUT/ours.json" --svg docs/frontier.svg > /dev/null
