#!/usr/bin/env bash
# Checks that sentence-transformers loads what `adadim quantize --model minilm --format f32`
# writes, and embeds with it what `adadim embed` does (max |difference| printed, must be < 1e-5).
# Usage: ST_PYTHON=path/to/venv/bin/python bench/peers/check-st-load.sh
# (ST_PYTHON: a Python with sentence-transformers and torch; not needed by adadim itself.)
set -euo pipefail
cd "$(dirname "$0")/../.."
ST_PYTHON="${ST_PYTHON:?set ST_PYTHON to a Python with sentence-transformers}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$A" quantize --model minilm --method gptq --dim ada --bits 4 --group 128 --nsamples 32 --format f32 --out "$W/q" > /dev/null
printf "A man is eating food.\nThe weather is lovely today.\nQuantization shrinks models, and AdaDim picks the axis.\n" > "$W/s.txt"
"$A" embed --model "$W/q" --input "$W/s.txt" --out "$W/e.json" 2> /dev/null
"$ST_PYTHON" - "$W" <<'PY'
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
w = sys.argv[1]
model = SentenceTransformer(f"{w}/q", device="cpu")
sentences = [l.strip() for l in open(f"{w}/s.txt") if l.strip()]
theirs = model.encode(sentences)
ours = np.array(json.load(open(f"{w}/e.json"))["embeddings"])
diff = float(np.abs(theirs - ours).max())
print(f"sentence-transformers loaded the quantized directory; max |difference| to adadim embed: {diff:.3e}")
sys.exit(0 if diff < 1e-5 else 1)
PY
