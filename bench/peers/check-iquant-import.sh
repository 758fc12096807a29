#!/usr/bin/env bash
# import-gguf's i-quant decoders against llama.cpp's own dequantization, on real files: each
# i-quant made of SmolLM2 by llama-quantize (importance matrix from 32 x 512 Shakespeare tokens;
# the 1- and 2-bit types need one), then turned back into F32 by llama-quantize itself
# (`--allow-requantize X.gguf Y.gguf F32`). Both files are imported with `adadim import-gguf`
# and every tensor compared; a type passes when all are equal bit for bit.
# Usage: bench/peers/check-iquant-import.sh [LLAMACPP_BIN_DIR]  (default: the build-llamacpp.sh one)
# Env: TYPES (default every i-quant), OUT (results/iquant-check), ADADIM_BIN.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${1:-${ADADIM_HOME:-$HOME/.cache/adadim}/peers/llama.cpp/bin}"
TYPES="${TYPES:-IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS}"
OUT="${OUT:-results/iquant-check}"
if [ -n "${ADADIM_BIN:-}" ]; then A="$ADADIM_BIN"; else cargo build --release -p adadim; A=./target/release/adadim; fi
HOME_DIR="${ADADIM_HOME:-$HOME/.cache/adadim}"
SRC="$HOME_DIR/models/smollm2.gguf"
[ -f "$SRC" ] || { echo "no $SRC: run \`adadim eval ppl --model smollm2\` once to fetch it" >&2; exit 1; }
mkdir -p "$OUT"
CALIB="$OUT/calib.txt"
[ -f "$CALIB" ] || cp "$HOME_DIR/data/shakespeare.txt" "$CALIB"
IMATRIX="$OUT/imatrix.dat"
[ -f "$IMATRIX" ] || "$BIN/llama-imatrix" -m "$SRC" -f "$CALIB" -o "$IMATRIX" --chunks 32 -c 512 -t "$(nproc)" > "$OUT/imatrix.log" 2>&1
for t in $TYPES; do
  q="$OUT/$t.gguf"; f="$OUT/$t-F32.gguf"
  [ -f "$q" ] || "$BIN/llama-quantize" --allow-requantize --imatrix "$IMATRIX" "$SRC" "$q" "$t" > "$OUT/$t.log" 2>&1
  [ -f "$f" ] || "$BIN/llama-quantize" --allow-requantize "$q" "$f" F32 >> "$OUT/$t.log" 2>&1
  rm -rf "$OUT/$t-ours" "$OUT/$t-ref"
  "$A" import-gguf "$q" --out "$OUT/$t-ours" > /dev/null
  "$A" import-gguf "$f" --out "$OUT/$t-ref" > /dev/null
  python3 - "$OUT/$t-ours/model.safetensors" "$OUT/$t-ref/model.safetensors" "$t" <<'PY'
import json, struct, sys
def tensors(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in h.items() if k != "__metadata__"}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = sum(a[k] == b.get(k) for k in a)
print(f"{sys.argv[3]}: {same} of {len(a)} tensors equal bit for bit" + ("" if same == len(a) == len(b) else "  MISMATCH"))
PY
  rm -rf "$OUT/$t-ours" "$OUT/$t-ref"
done
