#!/usr/bin/env bash
# Runs every cargo-fuzz target for $SECONDS_PER_TARGET (default 600) one after another, niced,
# each from the committed corpus (fuzz/corpus/<target>, read only) into a working corpus
# (fuzz/corpus-work/<target>, git-ignored), with the target's dictionary. Logs go to
# fuzz/logs/<target>.log; the last lines of each hold the figures fuzz/README.md records.
# Stable Rust: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes.
set -uo pipefail
cd "$(dirname "$0")"
secs="${SECONDS_PER_TARGET:-600}"
export RUSTC_BOOTSTRAP=1 RAYON_NUM_THREADS=1
mkdir -p logs
nice -n 19 cargo fuzz build -O || exit 1
for t in ${TARGETS:-fuzz_config fuzz_safetensors fuzz_gguf fuzz_packed fuzz_tokenizer_config fuzz_resume}; do
  case "$t" in
    fuzz_config) dict=dicts/config.dict ;;
    fuzz_gguf) dict=dicts/gguf.dict ;;
    fuzz_tokenizer_config) dict=dicts/tokenizer_config.dict ;;
    fuzz_resume) dict=dicts/resume.dict ;;
    *) dict=dicts/safetensors.dict ;;
  esac
  mkdir -p "corpus-work/$t"
  start=$(date +%s)
  nice -n 19 cargo fuzz run -O "$t" "corpus-work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -dict="$dict" -print_final_stats=1 \
    > "logs/$t.log" 2>&1
  echo "$t: exit $? after $(( $(date +%s) - start )) s" | tee -a logs/summary.txt
done
