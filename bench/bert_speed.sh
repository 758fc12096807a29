#!/usr/bin/env bash
# MiniLM sentences per second, ours (f32 and packed w4g128) against sentence-transformers on
# PyTorch (CPU, the same threads), batch 1 and 32, the same sentences (the first N WikiText-2
# test sentences of at most 128 tokens), interleaved in one run; the table goes into
# BENCHMARKS.md's "bert" section.
# Usage: ADADIM_DATA=../shared/data ST_PYTHON=path/to/venv/bin/python bench/bert_speed.sh
# Knobs (env): N (2000 sentences), ROUNDS (2), THREADS (2), ST_PYTHON (a Python with
# sentence-transformers and torch; `python3 -m venv V && V/bin/pip install sentence-transformers torch`).
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
N="${N:-2000}"; ROUNDS="${ROUNDS:-2}"; THREADS="${THREADS:-2}"; ST_PYTHON="${ST_PYTHON:?set ST_PYTHON}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
W="${WORK:-$(mktemp -d)}"; mkdir -p "$W"
# `embed --model minilm` fetches the model into $ADADIM_HOME when it is not there yet.
echo "This sentence makes sure the model is fetched." > "$W/one.txt"
"$A" embed --model minilm --input "$W/one.txt" > /dev/null 2>&1
MINILM="${ADADIM_HOME:-$HOME/.cache/adadim}/models/minilm"
"$ST_PYTHON" - "$ADADIM_DATA/wikitext-2-raw/wiki.test.raw" "$MINILM" "$N" > "$W/sentences.txt" <<'PY'
import sys
from tokenizers import Tokenizer
text, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(f"{model}/tokenizer.json"); tok.no_truncation(); tok.no_padding()
out = []
for line in open(text, encoding="utf-8"):
    line = line.strip()
    if not line or line.startswith("="):
        continue
    for s in line.replace(" . ", " .\n").split("\n"):
        s = s.strip()
        if len(s.split()) >= 4 and len(tok.encode(s).ids) <= 128:
            out.append(s)
    if len(out) >= n:
        break
print("\n".join(out[:n]))
PY
[ -d "$W/w4g128" ] || "$A" quantize --model minilm --method gptq --dim ada --bits 4 --group 128 --out "$W/w4g128" >/dev/null
: > "$W/speed.jsonl"
for round in $(seq "$ROUNDS"); do
  for batch in 1 32; do
    for m in minilm "$W/w4g128"; do
      name=$([ "$m" = minilm ] && echo "adadim f32" || echo "adadim packed w4g128")
      RAYON_NUM_THREADS=$THREADS "$A" embed --model "$m" --input "$W/sentences.txt" --batch "$batch" --out "$W/e.json" 2> "$W/err.txt"
      rate=$(sed -n 's/.*(\([0-9.]*\) sentences\/s.*/\1/p' "$W/err.txt")
      echo "{\"tool\": \"$name\", \"batch\": $batch, \"round\": $round, \"sentences_per_s\": $rate}" >> "$W/speed.jsonl"
    done
    "$ST_PYTHON" bench/bert_speed.py "$MINILM" "$W/sentences.txt" "$THREADS" "$batch" | sed "s/}\$/, \"round\": $round}/" >> "$W/speed.jsonl"
  done
done
python3 bench/bert_speed_table.py "$W/speed.jsonl" BENCHMARKS.md "$N" "$THREADS"
