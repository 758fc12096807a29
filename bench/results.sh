#!/usr/bin/env bash
# Regenerate RESULTS.md: quantize the default model with every method of the paper and its
# baselines, evaluate each with the same evaluator and protocol, and tabulate.
# Usage: ADADIM_DATA=../shared/data bench/results.sh
# Knobs (env): MODEL (smollm2), CONFIGS ("4:128 3:128 3:64 2:64"), NSAMPLES (32), CALIB_SEQLEN (512),
# WINDOWS (8 eval windows; 0 = all), OUT (results/run), ADADIM_BIN (a prebuilt binary instead
# of building one), LLAMA_BIN (a llama.cpp build for the quality-per-bit section). Finished runs in
# OUT are reused, so an interrupted run picks up where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="${MODEL:-smollm2}"; CONFIGS="${CONFIGS:-4:128 3:128 3:64 2:64}"; NSAMPLES="${NSAMPLES:-32}"
CALIB_SEQLEN="${CALIB_SEQLEN:-512}"; WINDOWS="${WINDOWS:-8}"; OUT="${OUT:-results/run}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
mkdir -p "$OUT"
# Finished runs in OUT are reused: record the code they come from (the table names it).
[ -f "$OUT/COMMIT" ] || git rev-parse --short HEAD > "$OUT/COMMIT"
limit=(); [ "$WINDOWS" != 0 ] && limit=(--limit "$WINDOWS")
eval_to() { # model dir, json file
  if [ ! -f "$2" ]; then
    $A eval ppl --model "$1" --dataset wikitext2 "${limit[@]}" --json > "$2.tmp"
    mv "$2.tmp" "$2"
  fi
}
eval_to "$MODEL" "$OUT/fp.ppl.json"
METHODS=(
  "rtn-oc:--method rtn --dim oc"
  "rtn-ada:--method rtn --dim ada"
  "gptq-oc:--method gptq --dim oc --act-order false --static-groups false --percdamp 0.01 --qep 0"
  "gptq-oc-act:--method gptq --dim oc --act-order --static-groups false --percdamp 0.01 --qep 0"
  "gptq-oc-act-static:--method gptq --dim oc --act-order --static-groups --percdamp 0.01 --qep 0"
  "gptq-ada:--method gptq --dim ada --act-order false --static-groups false --percdamp 0.01 --qep 0"
  "gptq-ada-act-static:--method gptq --dim ada --act-order --static-groups --percdamp 0.01 --qep 0"
)
for cfg in $CONFIGS; do
  bits=${cfg%%:*}; group=${cfg##*:}
  for m in "${METHODS[@]}"; do
    name=${m%%:*}; args=${m#*:}
    dir="$OUT/w${bits}g${group}-$name"
    # The paper's methods fit groups min-max (pinned: the CLI's default search is mse).
    [ -d "$dir" ] || $A quantize --model "$MODEL" $args --scale-search minmax --bits "$bits" --group "$group" \
        --nsamples "$NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" --out "$dir" --json > /dev/null
    eval_to "$dir" "$dir.ppl.json"
  done
done
python3 bench/results_table.py "$OUT" > RESULTS.md.tmp
# Sections other scripts measured (bench/tasks.sh) follow a `<!-- kept -->` line: carried over.
if [ -f RESULTS.md ]; then sed -n '/^<!-- kept -->$/,$p' RESULTS.md >> RESULTS.md.tmp; fi
mv RESULTS.md.tmp RESULTS.md
# Quality per bit: the same runs beside llama.cpp's llama-quantize types (built once from the
# PyPI sdist, ~20 minutes; LLAMA_BIN=DIR uses an existing build), all evaluated by our evaluator.
LLAMA_BIN="${LLAMA_BIN:-$(bench/peers/build-llamacpp.sh | tail -n 1)}"
$A bench quality --runs "$OUT" --llamacpp "$LLAMA_BIN" --write RESULTS.md --svg docs/quality-per-bit.svg > /dev/null
echo "wrote RESULTS.md"
