#!/usr/bin/env bash
# Tokenize the golden prompt and WikiText-2 with llama.cpp's own tokenizer (llama-tokenize on
# the SmolLM2 GGUF) and write tests/reference/llamacpp_tokens.json: an independent check of
# the tokenizer adadim rebuilds from the GGUF metadata.
# Usage: bench/peers/llamacpp-tokens.sh   (needs build-llamacpp.sh's binaries, the model in
# $ADADIM_HOME, and $ADADIM_DATA)
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${ADADIM_HOME:-$HOME/.cache/adadim}"
BIN="$HOME_DIR/peers/llama.cpp/bin/llama-tokenize"
GGUF="$HOME_DIR/models/smollm2.gguf"
WIKI="${ADADIM_DATA:?set ADADIM_DATA}/wikitext-2-raw/wiki.test.raw"
PROMPT=$(python3 -c 'import json;print(json.load(open("tests/reference/smollm2_reference.json"))["prompt"]["text"], end="")')
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
printf '%s' "$PROMPT" > "$tmp/prompt.txt"
"$BIN" -m "$GGUF" -f "$tmp/prompt.txt" --ids --no-bos --log-disable > "$tmp/prompt.ids" 2>/dev/null
"$BIN" -m "$GGUF" -f "$WIKI" --ids --no-bos --log-disable > "$tmp/wiki.ids" 2>/dev/null
python3 - "$tmp" <<'PY'
import hashlib, json, sys
d = sys.argv[1]
def ids(p):
    return json.loads(open(p).read().strip().splitlines()[-1])
w, p = ids(d + "/wiki.ids"), ids(d + "/prompt.ids")
out = {"tool": "llama-tokenize (llama.cpp vendored in llama-cpp-python 0.3.36) --ids --no-bos",
       "prompt": {"token_ids": p},
       "wikitext2": {"n_tokens": len(w), "token_ids_sha256": hashlib.sha256(",".join(map(str, w)).encode()).hexdigest()}}
json.dump(out, open("tests/reference/llamacpp_tokens.json", "w"), indent=1)
print(out["wikitext2"], p)
PY
