#!/usr/bin/env bash
# Compile the CUDA sources of the patched llama.cpp with nvcc for one GPU arch (no GPU needed).
# Only the object files of the MUL_MAT_ID-related sources are built, not the whole ggml-cuda library
# (a full ggml-cuda build takes hours on 2 cores). Nothing is linked or run.
#
#   native/check_cuda.sh [ARCH] [SOURCES...]
#
# ARCH: one CUDA arch number (default 89). SOURCES: paths relative to ggml/src/ggml-cuda (default: the
# sources that patches/0002-mcsharp-mmid-gpu.patch touches, plus one template instance of each touched
# kernel header, see DEFAULT_SOURCES).
#
# Environment:
#   MCSHARP_CACHE      cache root (default ~/.cache/mcsharp-gguf): pristine sources; scratch tree and
#                      cmake build in $MCSHARP_CACHE/work/cuda-check
#   MCSHARP_PATCH_DIR  patch set to apply (default native/patches)
#   CUBLAS_ROOT        a directory with include/cublas_v2.h (and lib/libcublas.so*) when the CUDA toolkit
#                      has no cuBLAS; otherwise it is looked up in the Python environment, and if it is
#                      not there the `nvidia-cublas` wheel is pip-installed into $MCSHARP_CACHE/cuda-deps
#   PYTHON             interpreter that can import mcsharp_gguf (default .venv/bin/python, else python3)
set -euo pipefail

DEFAULT_SOURCES=(
    mmid.cu            # ids helper for MMQ / MMF (id -> row mapping): invalid ids skipped, their dst rows zeroed
    mmq.cu             # MMQ host side (passes dst to the ids helper)
    mmf.cu             # MMF host side (passes dst to the ids helper)
    template-instances/mmf-instance-ncols_16.cu  # mul_mat_f<has_ids> kernel (mmf.cuh): zero rows of invalid slots
    mmvq.cu            # quantized mat-vec: single-token and MoE multi-token kernels (+ fused gate/up)
    mmvf.cu            # float mat-vec: single- and multi-token MUL_MAT_ID kernels (+ fused gate/up)
    ggml-cuda.cu       # ggml_cuda_mul_mat_id generic path (host id -> row mapping + gather/scatter)
)

ARCH="${1:-89}"
[ $# -gt 0 ] && shift
SOURCES=("$@")
if [ ${#SOURCES[@]} -eq 0 ]; then
    SOURCES=("${DEFAULT_SOURCES[@]}")
fi
case "$ARCH" in
    *[!0-9]*|"") echo "ARCH must be a number like 89 or 90, got '$ARCH'" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
NVCC="$(command -v nvcc || true)"
[ -n "$NVCC" ] || { echo "nvcc not found on PATH; install the CUDA toolkit (e.g. pip wheel nvidia-cuda-nvcc)" >&2; exit 2; }
command -v cmake >/dev/null || { echo "cmake not found" >&2; exit 2; }

# mcsharp_gguf.native.build knows where the pristine llama.cpp lives (downloads/extracts it once)
PRISTINE="$(cd "$REPO" && "$PY" -c 'from mcsharp_gguf.native.build import pristine_source; print(pristine_source())')"
CACHE="$(cd "$REPO" && "$PY" -c 'from mcsharp_gguf.native.build import cache_root; print(cache_root())')"
PATCHES="$(cd "${MCSHARP_PATCH_DIR:-$HERE/patches}" && pwd)"
WORK="$CACHE/work/cuda-check"
SRC="$WORK/src"
BLD="$WORK/build"
mkdir -p "$WORK"

# ---- cuBLAS headers: every ggml-cuda source includes <cublas_v2.h> (vendors/cuda.h) --------------------
NVCC_VER="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
CUDA_HOME_GUESS="$("$NVCC" -v --version 2>&1 | sed -n 's/^#\$ TOP=\(.*\)$/\1/p' | head -1)"
EXTRA_INC=""
EXTRA_LIB=""
find_cublas() {  # prints a dir holding include/cublas_v2.h
    local d
    for d in "${CUBLAS_ROOT:-}" "$CUDA_HOME_GUESS" /usr/local/cuda; do
        [ -n "$d" ] && [ -f "$d/include/cublas_v2.h" ] && { echo "$d"; return 0; }
    done
    for py in "$PY" python3; do
        d="$("$py" - "$NVCC_VER" 2>/dev/null <<'EOF' || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    for sub in (f"nvidia/cu{sys.argv[1]}", "nvidia/cublas"):
        if os.path.isfile(os.path.join(r, sub, "include", "cublas_v2.h")):
            print(os.path.join(r, sub)); sys.exit(0)
EOF
)"
        [ -n "$d" ] && { echo "$d"; return 0; }
    done
    d="$CACHE/cuda-deps/nvidia/cu$NVCC_VER"
    [ -f "$d/include/cublas_v2.h" ] && { echo "$d"; return 0; }
    d="$CACHE/cuda-deps/nvidia/cublas"
    [ -f "$d/include/cublas_v2.h" ] && { echo "$d"; return 0; }
    return 1
}
CUBLAS_DIR="$(find_cublas || true)"
if [ -z "$CUBLAS_DIR" ]; then
    if [ "$NVCC_VER" -ge 13 ]; then WHEEL="nvidia-cublas"; else WHEEL="nvidia-cublas-cu$NVCC_VER"; fi
    echo "cuBLAS headers not found; installing the $WHEEL wheel into $CACHE/cuda-deps"
    "$PY" -m pip install -q --no-deps --target "$CACHE/cuda-deps" "$WHEEL" \
        || python3 -m pip install -q --no-deps --target "$CACHE/cuda-deps" "$WHEEL"
    CUBLAS_DIR="$(find_cublas || true)"
    [ -n "$CUBLAS_DIR" ] || { echo "still no cublas_v2.h; set CUBLAS_ROOT" >&2; exit 2; }
fi
if [ "$CUBLAS_DIR" != "$CUDA_HOME_GUESS" ] && [ "$CUBLAS_DIR" != /usr/local/cuda ]; then
    # wheels ship libcublas.so.N only; FindCUDAToolkit looks for libcublas.so (CUDA::cublas must exist)
    SHIM="$WORK/cublas-shim"
    mkdir -p "$SHIM/lib"
    for l in "$CUBLAS_DIR"/lib/libcublas*.so*; do
        [ -e "$l" ] || continue
        b="$(basename "$l")"
        ln -sf "$l" "$SHIM/lib/$b"
        ln -sf "$l" "$SHIM/lib/${b%%.so*}.so"
    done
    EXTRA_INC="$CUBLAS_DIR/include"
    EXTRA_LIB="$SHIM/lib"
    echo "cuBLAS from $CUBLAS_DIR"
fi

# libcuda.so (CUDA::cuda_driver) comes with the GPU driver, not with the pip toolkit. Nothing is linked here, so
# an empty stand-in library is enough to let cmake generate the ggml-cuda target.
NO_VMM=OFF
if ! ls "$CUDA_HOME_GUESS"/lib64/libcuda.so "$CUDA_HOME_GUESS"/lib64/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so \
        /usr/lib64/libcuda.so "$CUDA_HOME_GUESS"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1; then
    SHIM="$WORK/cublas-shim"
    mkdir -p "$SHIM/lib"
    if [ -f "$SHIM/lib/libcuda.so" ] || { command -v cc >/dev/null && cc -shared -o "$SHIM/lib/libcuda.so" -x c /dev/null; }; then
        EXTRA_LIB="$SHIM/lib"
    else
        NO_VMM=ON   # no C compiler for the stand-in: drop the driver dependency (skips the VMM pool code)
    fi
fi

# ---- patched copy of the tree -----------------------------------------------------------------------------
# rsync keeps the mtimes of unchanged files, so only the patched files (and what includes them) recompile.
mkdir -p "$SRC"
if command -v rsync >/dev/null; then
    rsync -a --delete --exclude .git "$PRISTINE/" "$SRC/"
else
    rm -rf "$SRC" && mkdir -p "$SRC" && cp -a "$PRISTINE/." "$SRC/" && rm -rf "$SRC/.git"
fi
shopt -s nullglob
PATCH_FILES=("$PATCHES"/*.patch)
shopt -u nullglob
[ ${#PATCH_FILES[@]} -gt 0 ] || echo "warning: no patches in $PATCHES (compiling stock sources)" >&2
for p in "${PATCH_FILES[@]}"; do
    # GIT_CEILING_DIRECTORIES: never let git apply find an enclosing repository (it would then apply the
    # paths relative to that repository's root and silently skip them).
    (cd "$SRC" && GIT_CEILING_DIRECTORIES="$WORK" git apply --whitespace=nowarn "$p")
    echo "applied $(basename "$p")"
done

# ---- configure (once; cmake re-runs itself when a CMakeLists changes) ------------------------------------
CMAKE_ARGS=(-G "Unix Makefiles" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_BUILD_TYPE=Release
            -DCMAKE_CUDA_COMPILER="$NVCC"
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
            -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF)
CMAKE_ARGS+=(-DGGML_CUDA_NO_VMM="$NO_VMM")
if [ -n "$EXTRA_LIB" ]; then
    CMAKE_ARGS+=(-DCMAKE_LIBRARY_PATH="$EXTRA_LIB")
fi
if [ -n "$EXTRA_INC" ]; then
    CMAKE_ARGS+=("-DCMAKE_CUDA_FLAGS=-I$EXTRA_INC" "-DCMAKE_CXX_FLAGS=-I$EXTRA_INC")
fi
if [ -f "$BLD/CMakeCache.txt" ] && ! grep -q "^CMAKE_CUDA_ARCHITECTURES:STRING=$ARCH\$" "$BLD/CMakeCache.txt"; then
    rm -rf "$BLD"   # another arch: start over rather than mixing object files
fi
if ! cmake -S "$SRC" -B "$BLD" "${CMAKE_ARGS[@]}" >"$WORK/configure.log" 2>&1; then
    tail -n 40 "$WORK/configure.log" >&2
    echo "cmake configure failed (full log: $WORK/configure.log)" >&2
    exit 1
fi

# ---- compile the object files ----------------------------------------------------------------------------
# The Makefile generator has one target per object file in the directory of the target (ggml-cuda).
cd "$BLD/ggml/src/ggml-cuda"
for s in "${SOURCES[@]}"; do
    [ -f "$SRC/ggml/src/ggml-cuda/$s" ] || { echo "no such source: ggml/src/ggml-cuda/$s" >&2; exit 2; }
    t0=$(date +%s)
    echo "nvcc (sm_$ARCH): $s"
    make --no-print-directory "$s.o" >"$WORK/make-$(basename "$s").log" 2>&1 || {
        cat "$WORK/make-$(basename "$s").log" >&2
        echo "FAILED: $s" >&2
        exit 1
    }
    grep -i "warning" "$WORK/make-$(basename "$s").log" | grep -v "^make" | head -n 20 || true
    echo "  ok ($(( $(date +%s) - t0 )) s)"
done
echo "OK: ${SOURCES[*]} compile for sm_$ARCH"
