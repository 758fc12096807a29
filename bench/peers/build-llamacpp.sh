#!/usr/bin/env bash
# Build llama.cpp as a benchmark peer for adadim, reproducibly.
#
# Source: the llama.cpp tree vendored in the PyPI sdist llama-cpp-python==0.3.36
# (pinned by sha256 below). Builds only the tools we compare against and copies them to
#   ${ADADIM_HOME:-$HOME/.cache/adadim}/peers/llama.cpp/bin/
# Idempotent: if every binary is already installed, nothing is rebuilt.
# Prints the bin dir as the last line of stdout.
#
# Env overrides: ADADIM_HOME, LLAMACPP_JOBS (default: nproc), LLAMACPP_FORCE=1 (rebuild).
#
# Notes:
# * `pip download --no-binary :all:` also forces pip to build the sdist's *build*
#   dependencies (cmake, ninja) from source just to prepare metadata (tens of minutes);
#   `--no-binary llama-cpp-python` keeps the sdist requirement but lets those be wheels.
# * GGML_NATIVE=ON: the binaries use -march=native and are not portable to other CPUs.
# * Static libs so the copied binaries do not depend on the build tree.
# * Network-dependent features are off: LLAMA_OPENSSL (HTTPS model download; LLAMA_CURL is
#   deprecated and ignored in this tree) and the server's web UI (prebuilt UI download); the
#   server itself is built (bench/serve.sh), without its UI.
# * On CPUs with AMX, pass --no-repack to the tools (the AMX path segfaults otherwise).
set -euo pipefail

LCP_PY_VERSION=0.3.36
SDIST_NAME="llama_cpp_python-${LCP_PY_VERSION}.tar.gz"
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

ADADIM_HOME="${ADADIM_HOME:-$HOME/.cache/adadim}"
PEER_DIR="$ADADIM_HOME/peers/llama.cpp"
BIN_DIR="$PEER_DIR/bin"
DL_DIR="$PEER_DIR/download"
SRC_DIR="$PEER_DIR/src"
BUILD_DIR="$PEER_DIR/build"
JOBS="${LLAMACPP_JOBS:-$(nproc 2>/dev/null || echo 2)}"

TARGETS=(llama-perplexity llama-quantize llama-imatrix llama-bench llama-batched-bench llama-tokenize test-backend-ops llama-server)

log() { echo "[build-llamacpp] $*" >&2; }

all_installed() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN_DIR/$t" ]] || return 1
    done
    return 0
}

if [[ "${LLAMACPP_FORCE:-0}" != 1 ]] && all_installed; then
    log "all binaries already present in $BIN_DIR; skipping build"
    echo "$BIN_DIR"
    exit 0
fi

# ---- build dependencies -------------------------------------------------------------
SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
apt_updated=0
need_pkg() {  # need_pkg <command> <debian package>
    if ! command -v "$1" >/dev/null 2>&1; then
        if ! command -v apt-get >/dev/null 2>&1; then
            log "missing '$1' and apt-get is unavailable; install '$2' manually"; exit 1
        fi
        if [[ $apt_updated == 0 ]]; then
            log "apt-get update"
            $SUDO apt-get update -qq >&2
            apt_updated=1
        fi
        log "apt-get install $2"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2" >&2
    fi
}
need_pkg cmake cmake
need_pkg make make
need_pkg g++ g++
need_pkg python3 python3

PY=python3
if ! $PY -m pip --version >/dev/null 2>&1; then
    need_pkg pip3 python3-pip
fi

# ---- fetch + verify the sdist ---------------------------------------------------------
mkdir -p "$DL_DIR"
sdist="$DL_DIR/$SDIST_NAME"
sha_ok() { [[ -f "$1" ]] && echo "$SDIST_SHA256  $1" | sha256sum -c --status -; }
if ! sha_ok "$sdist"; then
    rm -f "$sdist"
    log "downloading sdist llama-cpp-python==$LCP_PY_VERSION"
    $PY -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LCP_PY_VERSION" -d "$DL_DIR" >&2
fi
if ! sha_ok "$sdist"; then
    log "sha256 mismatch or missing file: $sdist (expected $SDIST_SHA256)"; exit 1
fi

# ---- unpack -----------------------------------------------------------------------------
LLAMA_SRC="$SRC_DIR/llama_cpp_python-${LCP_PY_VERSION}/vendor/llama.cpp"
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    rm -rf "$SRC_DIR"; mkdir -p "$SRC_DIR"
    log "unpacking $sdist"
    tar -xzf "$sdist" -C "$SRC_DIR"
fi
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || { log "no vendor/llama.cpp in sdist"; exit 1; }

# ---- configure + build ---------------------------------------------------------------------
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DLLAMA_BUILD_TESTS=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_LLGUIDANCE=OFF
    -DBUILD_SHARED_LIBS=OFF
)
log "configuring (${CMAKE_FLAGS[*]})"
cmake -S "$LLAMA_SRC" -B "$BUILD_DIR" "${CMAKE_FLAGS[@]}" >&2
log "building ${TARGETS[*]} with -j$JOBS"
cmake --build "$BUILD_DIR" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2

# ---- install ---------------------------------------------------------------------------------
mkdir -p "$BIN_DIR"
for t in "${TARGETS[@]}"; do
    [[ -x "$BUILD_DIR/bin/$t" ]] || { log "build did not produce $BUILD_DIR/bin/$t"; exit 1; }
    cp -f "$BUILD_DIR/bin/$t" "$BIN_DIR/$t.tmp"
    mv -f "$BIN_DIR/$t.tmp" "$BIN_DIR/$t"
done
{
    echo "source: PyPI sdist llama-cpp-python==$LCP_PY_VERSION ($SDIST_NAME sha256 $SDIST_SHA256), vendor/llama.cpp"
    echo "cmake flags: ${CMAKE_FLAGS[*]}"
    echo "compiler: $(${CXX:-c++} --version | head -1)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
} > "$PEER_DIR/BUILD_INFO.txt"
log "installed: ${TARGETS[*]}"
echo "$BIN_DIR"
