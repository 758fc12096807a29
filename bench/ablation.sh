#!/usr/bin/env bash
# The quality ablation of issue 31: each variant quantized with 3 calibration seeds and
# evaluated on two held-out texts (WikiText-2 and PTB, first WINDOWS windows of 2048), then
# tabulated as mean and spread into RESULTS.md's "Ablation" section (bench/ablation_table.py).
# Usage: ADADIM_DATA=../shared/data bench/ablation.sh
# Knobs (env): MODEL (smollm2), CONFIGS ("3:128 4:128"), VARIANTS (names below), SEEDS ("0 1 2"),
# NSAMPLES (128), CALIB_SEQLEN (512), WINDOWS (8), OUT (results/ablation), SECTION (the
# RESULTS.md section written: ablation, descend, calib, calib-w4, calib-w3 or damp), ADADIM_BIN and
# ADADIM_COMMIT (the commit that binary was built from, recorded per run).
# Finished runs in OUT are reused; quantized models are deleted once evaluated (their
# report.json is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="${MODEL:-smollm2}"; CONFIGS="${CONFIGS:-3:128 4:128}"; SEEDS="${SEEDS:-0 1 2}"
NSAMPLES="${NSAMPLES:-128}"; CALIB_SEQLEN="${CALIB_SEQLEN:-512}"; WINDOWS="${WINDOWS:-8}"
OUT="${OUT:-results/ablation}"
declare -A ARGS=(
  [rtn-oc]="--method rtn --dim oc --scale-search minmax"
  [rtn-oc-mse]="--method rtn --dim oc --scale-search mse"
  [rtn-oc-float]="--method rtn --dim oc --scale-search minmax --zero float"
  [rtn-oc-awq]="--method rtn --dim oc --scale-search minmax --awq"
  [rtn-oc-mse-float]="--method rtn --dim oc --scale-search mse --zero float"
  [gptq-oc]="--method gptq --dim oc --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-oc-mse]="--method gptq --dim oc --scale-search mse --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-oc-mse-awq]="--method gptq --dim oc --scale-search mse --awq --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [rtn-ada]="--method rtn --dim ada --scale-search minmax"
  [rtn-ada-mse]="--method rtn --dim ada --scale-search mse"
  [gptq-ada]="--method gptq --dim ada --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-mse]="--method gptq --dim ada --scale-search mse --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-act]="--method gptq --dim ada --act-order --static-groups --scale-search minmax --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse]="--method gptq --dim ada --act-order --static-groups --scale-search mse --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-refit]="--method gptq --dim ada --act-order --static-groups --scale-search mse --refit --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-cd4]="--method gptq --dim ada --act-order --static-groups --scale-search mse --descend 4 --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-cd1]="--method gptq --dim ada --act-order --static-groups --scale-search mse --descend 1 --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-gsm8k]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib gsm8k --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-mix]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib mix --percdamp 0.01 --qep 0"
  [gptq-ada-act-mse-mix-damp10]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib mix --percdamp 0.1 --qep 0"
  [gptq-ada-act-mse-mix-damp10-qep05]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib mix --percdamp 0.1 --qep 0.5"
  [gptq-ada-act-mse-mix-damp10-qep075]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib mix --percdamp 0.1 --qep 0.75"
  [gptq-ada-act-mse-mix-damp10-qep05-rot]="--method gptq --dim ada --act-order --static-groups --scale-search mse --calib mix --percdamp 0.1 --qep 0.5 --rotate 0"
  [gptq-ada-act-mse-damp10-qep05]="--method gptq --dim ada --act-order --static-groups --scale-search mse --percdamp 0.1 --qep 0.5"
  [gptq-ada-gar-mse-mix-damp10-qep05]="--method gptq --dim ada --act-order --group-aware --scale-search mse --calib mix --percdamp 0.1 --qep 0.5"
  [gptq-ada-act-mse-damp10]="--method gptq --dim ada --act-order --static-groups --scale-search mse --percdamp 0.1 --qep 0"
  [gptq-ada-act-mse-damp100]="--method gptq --dim ada --act-order --static-groups --scale-search mse --percdamp 1 --qep 0"
  [rtn-ada-mse-cd4]="--method rtn --dim ada --scale-search mse --descend 4"
  [gptq-ada-act-mse-qep05]="--method gptq --dim ada --act-order --static-groups --scale-search mse --qep 0.5 --percdamp 0.01"
  [gptq-ada-act-mse-float]="--method gptq --dim ada --act-order --static-groups --scale-search mse --zero float --percdamp 0.01 --qep 0"
  [rtn-ada-awq]="--method rtn --dim ada --awq --scale-search minmax"
  [gptq-ada-awq]="--method gptq --dim ada --awq --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-mse-awq]="--method gptq --dim ada --scale-search mse --awq --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-block]="--method gptq --dim ada --ada-error block --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-mse-block]="--method gptq --dim ada --scale-search mse --ada-error block --act-order false --static-groups false --percdamp 0.01 --qep 0"
  [gptq-ada-mse-awq-block]="--method gptq --dim ada --scale-search mse --awq --ada-error block --act-order false --static-groups false --percdamp 0.01 --qep 0"
)
VARIANTS="${VARIANTS:-rtn-ada rtn-ada-mse gptq-ada gptq-ada-mse}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
mkdir -p "$OUT"
[ -f "$OUT/COMMIT" ] || git rev-parse --short HEAD > "$OUT/COMMIT"
. bench/quality_runs.sh
for ds in wikitext2 ptb; do eval_to "$MODEL" "$ds" "$OUT/fp.$ds.json"; done
for cfg in $CONFIGS; do
  bits=${cfg%%:*}; group=${cfg##*:}
  for v in $VARIANTS; do
    for seed in $SEEDS; do
      # shellcheck disable=SC2086 # ARGS holds several flags
      quantize_and_eval "$OUT/w${bits}g${group}-$v-s$seed" ${ARGS[$v]} --bits "$bits" --group "$group" --seed "$seed"
    done
  done
done
python3 bench/ablation_table.py "$OUT" RESULTS.md "${SECTION:-ablation}"
