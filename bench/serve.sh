#!/usr/bin/env bash
# Load test of `adadim serve` (SmolLM2 packed w4g128, RTN-ada) against llama.cpp's llama-server
# (the Q4_0 GGUF of the same model, requantized from the shipped Q4_1), the same load on each
# (bench/serve_load.py), loopback only, ours and the peer's rounds interleaved; writes
# results/serve/*.json and the `serve` section of BENCHMARKS.md (bench/serve_table.py).
# Usage: ADADIM_DATA=../shared/data bench/serve.sh    (about 35 minutes on 2 cores)
# ROUNDS (default 2) rounds of both servers; PARALLEL (default 8) slots on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADADIM_DATA="${ADADIM_DATA:-$(cd .. && pwd)/shared/data}"
ADADIM_HOME="${ADADIM_HOME:-$HOME/.cache/adadim}"
ROUNDS="${ROUNDS:-2}"
PARALLEL="${PARALLEL:-8}"
CTX=2048
cargo build --release -p adadim
A=./target/release/adadim
OUT=results/serve
mkdir -p "$OUT"
LLAMA_BIN="$(bench/peers/build-llamacpp.sh | tail -n 1)"
SERVER="$LLAMA_BIN/llama-server"
[[ -x "$SERVER" ]] || { echo "no $SERVER: bench/peers/build-llamacpp.sh builds it" >&2; exit 1; }
RUNS="$ADADIM_HOME/bench/decode"
mkdir -p "$RUNS"
[[ -d "$RUNS/w4g128" ]] || $A quantize --model smollm2 --method rtn --dim ada --bits 4 --group 128 \
    --nsamples 32 --calib-seqlen 512 --out "$RUNS/w4g128"
GGUF="$ADADIM_HOME/models/smollm2.gguf"
[[ -f "$RUNS/smollm2-Q4_0.gguf" ]] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$GGUF" "$RUNS/smollm2-Q4_0.gguf" Q4_0 2
TEXT="$ADADIM_DATA/wikitext-2-raw/wiki.test.raw"
PORT=18280

wait_health() {  # wait_health URL PID
    for _ in $(seq 600); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "the server exited before it answered" >&2; return 1; }
        sleep 0.2
    done
    echo "no answer from $1" >&2
    return 1
}

load() {  # load LABEL PORT
    python3 bench/serve_load.py --url "http://127.0.0.1:$2/v1" --model smollm2 --text "$TEXT" --label "$1" \
        --out "$OUT/$1.json" >/dev/null
}

for r in $(seq "$ROUNDS"); do
    $A serve --model "$RUNS/w4g128" --name smollm2 --port $PORT --parallel "$PARALLEL" --ctx $CTX 2>"$OUT/adadim.log" &
    pid=$!
    wait_health "http://127.0.0.1:$PORT" $pid
    load "adadim-r$r" $PORT || echo "adadim round $r: failed or truncated responses (see $OUT/adadim-r$r.json)" >&2
    kill -TERM $pid && wait $pid
    # llama-server: ctx is shared by its slots; 2 threads (the machine's cores), its repacked CPU layouts.
    "$SERVER" -m "$RUNS/smollm2-Q4_0.gguf" --host 127.0.0.1 --port $PORT -np "$PARALLEL" -c $((CTX * PARALLEL)) \
        -t "$(nproc)" -a smollm2 2>"$OUT/llama-server.log" &
    pid=$!
    wait_health "http://127.0.0.1:$PORT" $pid
    load "llama-server-r$r" $PORT || echo "llama-server round $r: failed or truncated responses" >&2
    kill -TERM $pid && wait $pid || true
done
python3 bench/serve_table.py "$OUT" BENCHMARKS.md
