# Sourced by bench/ablation.sh and bench/budget.sh: one quantized run evaluated and kept as
# its report.json and perplexities (the model itself deleted once evaluated); finished runs
# are skipped. Needs A (the binary), MODEL, WINDOWS, NSAMPLES, CALIB_SEQLEN.

eval_to() { # model dir, dataset, json file
  [ -f "$3" ] && return
  $A eval ppl --model "$1" --dataset "$2" --limit "$WINDOWS" --json > "$3.tmp" && mv "$3.tmp" "$3"
}

# quantize_and_eval RUN [quantize flags...]: RUN is the run's path; AFTER_QUANTIZE, when set,
# names a function called with RUN while the model is still there.
quantize_and_eval() {
  local run=$1; shift
  [ -f "$run.ptb.json" ] && return
  if [ ! -d "$run" ]; then
    $A quantize --model "$MODEL" "$@" --nsamples "$NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" \
      --out "$run" --json > "$run.quantize.json"
  fi
  cp "$run/report.json" "$run.report.json"
  if [ -n "${AFTER_QUANTIZE:-}" ]; then "$AFTER_QUANTIZE" "$run"; fi
  echo "${ADADIM_COMMIT:-$(git rev-parse --short HEAD)}" > "$run.commit"
  for ds in wikitext2 ptb; do eval_to "$run" "$ds" "$run.$ds.json"; done
  rm -rf "$run"
}
