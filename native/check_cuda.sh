#!/usr/bin/env bash
# Compile the CUDA sources of the patched llama.cpp with nvcc for one GPU arch (no GPU needed).
# Only the object files of the MUL_MAT_ID-related sources are built, not the whole ggml-cuda library.
#
#   native/check_cuda.sh [ARCH] [SOURCES...]      default ARCH 89, default sources below
#
# Uses $MCSHARP_CACHE (default ~/.cache/mcsharp-gguf) for the pristine sources and a scratch tree
# $MCSHARP_CACHE/work/cuda-check. Patches: $MCSHARP_PATCH_DIR or native/patches.
set -euo pipefail

ARCH="${1:-89}"
shift || true
SOURCES=("$@")
if [ ${#SOURCES[@]} -eq 0 ]; then
    SOURCES=(mmvq.cu mmid.cu mmf.cu ggml-cuda.cu mmq.cu)
fi

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
command -v nvcc >/dev/null || { echo "nvcc not found; install the CUDA toolkit" >&2; exit 2; }

PRISTINE="$("$PY" -c 'from mcsharp_gguf.native.build import pristine_source; print(pristine_source())')"
CACHE="$("$PY" -c 'from mcsharp_gguf.native.build import cache_root; print(cache_root())')"
PATCHES="${MCSHARP_PATCH_DIR:-$HERE/patches}"
WORK="$CACHE/work/cuda-check"
SRC="$WORK/src"
BLD="$WORK/build"

# patched copy of the tree (rsync keeps mtimes of unchanged files, so rebuilds stay incremental)
mkdir -p "$SRC"
rsync -a --delete --exclude .git "$PRISTINE/" "$SRC/"
for p in "$PATCHES"/*.patch; do
    [ -e "$p" ] || continue
    (cd "$SRC" && git apply --whitespace=nowarn "$p")
    echo "applied $(basename "$p")"
done

cmake -S "$SRC" -B "$BLD" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF >"$WORK/configure.log"

# the Makefile generator exposes one target per object file in the target's directory
cd "$BLD/ggml/src/ggml-cuda"
for s in "${SOURCES[@]}"; do
    echo "nvcc (sm_$ARCH): $s"
    make -s "$s.o"
done
echo "OK: ${SOURCES[*]} compile for sm_$ARCH"
