#!/usr/bin/env bash
# Issue 6 measurements (RESULTS.md "Task-specific calibration"): MMLU 5-shot and HumanEval
# pass@1 of the FP model and of the w3g128 methods (RTN, RTN-ada, GPTQ, GPTQ-ada: the runs
# bench/results.sh makes in RUNS, made here if missing, same settings); then WikiText-2 and
# code perplexity, MMLU and HumanEval of GPTQ-ada w3g128 calibrated on `code` vs the default
# `shakespeare`. Writes JSON into OUT; finished steps are reused.
# Usage: ADADIM_DATA=../shared/data bench/tasks.sh
# Knobs (env): MODEL (smollm2), MMLU_LIMIT (20 questions per subject), HE_LIMIT (all 164),
# CALIBS ("code shakespeare"), NSAMPLES (32 calibration samples of 512 tokens, the README's
# setting), OUT (results/tasks), RUNS (results/run), VARIANTS ("rtn-oc rtn-ada gptq-oc gptq-ada"),
# STRIP (1: also HumanEval with --strip-prompt), ADADIM_BIN (a prebuilt binary).
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="${MODEL:-smollm2}"; MMLU_LIMIT="${MMLU_LIMIT:-20}"; HE_LIMIT="${HE_LIMIT:-}"
CALIBS="${CALIBS:-code shakespeare}"; NSAMPLES="${NSAMPLES:-32}"; OUT="${OUT:-results/tasks}"
RUNS="${RUNS:-results/run}"; VARIANTS="${VARIANTS:-rtn-oc rtn-ada gptq-oc gptq-ada}"; STRIP="${STRIP:-}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
mkdir -p "$OUT"
he_limit=(); [ -n "$HE_LIMIT" ] && he_limit=(--limit "$HE_LIMIT")
# Code perplexity text: HumanEval's prompts with their reference solutions (fetched by
# `eval humaneval`, which runs first).
SOLUTIONS="$OUT/humaneval-solutions.py"
ppls() { # name, model
  [ -f "$SOLUTIONS" ] || python3 -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; open(sys.argv[2], 'w').write(''.join(r['prompt'] + r['canonical_solution'] + '\n\n' for r in rows))" "${ADADIM_HOME:-$HOME/.cache/adadim}/data/HumanEval.jsonl" "$SOLUTIONS"
  [ -f "$OUT/ppl-$1.json" ] || $A eval ppl --model "$2" --dataset wikitext2 --limit 8 --json > "$OUT/ppl-$1.json"
  [ -f "$OUT/codeppl-$1.json" ] || $A eval ppl --model "$2" --dataset "$SOLUTIONS" --seqlen 512 --json > "$OUT/codeppl-$1.json"
}
mmlu() { # name, model
  [ -f "$OUT/mmlu-$1.json" ] || { $A eval mmlu --model "$2" --limit "$MMLU_LIMIT" --json > "$OUT/mmlu-$1.tmp"; mv "$OUT/mmlu-$1.tmp" "$OUT/mmlu-$1.json"; }
}
humaneval() { # name, model, strip (1 = also --strip-prompt)
  [ -f "$OUT/humaneval-$1.json" ] || { $A eval humaneval --model "$2" "${he_limit[@]}" --json > "$OUT/humaneval-$1.tmp"; mv "$OUT/humaneval-$1.tmp" "$OUT/humaneval-$1.json"; }
  [ -z "$3" ] || [ -f "$OUT/humaneval-strip-$1.json" ] || { $A eval humaneval --model "$2" "${he_limit[@]}" --strip-prompt --json > "$OUT/humaneval-strip-$1.tmp"; mv "$OUT/humaneval-strip-$1.tmp" "$OUT/humaneval-strip-$1.json"; }
}
evals() { mmlu "$1" "$2"; humaneval "$1" "$2" "$3"; }
# The w3g128 methods' MMLU first (the longer evaluation), then FP's (the reference of the
# "same answer as FP" column), then the methods' HumanEval.
# The paper's methods: groups fitted min-max (pinned: the CLI's default search is mse).
declare -A ARGS=([rtn-oc]="--method rtn --dim oc --scale-search minmax" [rtn-ada]="--method rtn --dim ada --scale-search minmax" [gptq-oc]="--method gptq --dim oc --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0" [gptq-ada]="--method gptq --dim ada --scale-search minmax --act-order false --static-groups false --percdamp 0.01 --qep 0")
for v in $VARIANTS; do
  d="$RUNS/w3g128-$v"
  [ -d "$d" ] || $A quantize --model "$MODEL" ${ARGS[$v]} --bits 3 --group 128 --nsamples "$NSAMPLES" --calib-seqlen 512 --out "$d" --json > /dev/null
  mmlu "w3g128-$v" "$d"
done
evals fp "$MODEL" "$STRIP"; ppls fp "$MODEL"
for v in $VARIANTS; do humaneval "w3g128-$v" "$RUNS/w3g128-$v" "$STRIP"; done
# Calibration sets: shakespeare is the default, so its model is RUNS' w3g128-gptq-ada (results
# named after it are shared).
for c in $CALIBS; do
  if [ "$c" = shakespeare ]; then n=w3g128-gptq-ada; q="$RUNS/$n"; else n="$c"; q="$OUT/gptq-ada-w3g128-$c"; fi
  [ -d "$q" ] || $A quantize --model "$MODEL" --method gptq --dim ada --scale-search minmax --act-order false --static-groups false --bits 3 --group 128 --calib "$c" --percdamp 0.01 --qep 0 --nsamples "$NSAMPLES" --calib-seqlen 512 --out "$q" --json > "$OUT/quantize-$c.json"
  evals "$n" "$q" "$STRIP"; ppls "$n" "$q"
done
# RESULTS.md's section between its tasks markers, from the JSON above.
python3 bench/tasks_table.py "$OUT" "$RUNS" > "$OUT/section.md"
python3 - "$OUT/section.md" <<'PY'
import re, sys
new = open(sys.argv[1]).read().strip()
text = open("RESULTS.md").read()
pat = re.compile(r"<!-- begin tasks -->.*?<!-- end tasks -->", re.S)
if not pat.search(text):
    sys.exit("RESULTS.md has no <!-- begin tasks --> / <!-- end tasks --> section")
open("RESULTS.md.tmp", "w").write(pat.sub(lambda _: new, text))
PY
mv RESULTS.md.tmp RESULTS.md
echo "wrote $OUT and RESULTS.md's tasks section"
