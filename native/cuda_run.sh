#!/usr/bin/env bash
# Build the patched ggml with CUDA on a GPU machine and RUN the MUL_MAT_ID checks for
# patches/0002-mcsharp-mmid-gpu.patch (masked ids: id < 0 or >= n_as -> skip the slot, zero dst row).
# Written for one offline run on a lent H200 (sm_90); works on any machine with nvcc, cmake, a GPU.
#
#   native/cuda_run.sh [SRC] [OUTDIR]        (env: ARCH=90, BUDGET_S=560, JOBS=nproc)
#
# SRC (default .devcuda/llama.cpp): a llama.cpp tree of the pinned version. It can be pristine or already
# patched: each patch in native/patches is applied only if it is not applied yet (git apply -R --check).
# .devcuda/ is a scratch folder (in .git/info/exclude) prepared on the dev machine:
#   .devcuda/llama.cpp              the pinned llama.cpp (mcsharp_gguf.native.build.pristine_source()), trimmed to
#                                   what a ggml build needs (no .git, models, docs, examples, other backends)
# From this repo (applied / compiled by this script):
#   native/tests/test-backend-ops-masked-ids.patch  an opt-in masked-id mode for test-backend-ops
#                                   (MCSHARP_MASK_IDS=1: init_mul_mat_id_ids sets ~40% of the slots to -1 / n_mats
#                                   / n_mats+1000; =2: a repeated valid expert in one token)
#   native/tests/mmid_mask_gpu.c    masked-id test on the GPU backend vs a double reference, dst pre-filled with
#                                   NaN (derived from native/tests/test_mul_mat_id_mask.c)
# Device run (see native/README.md "GPU backends"):
#   run(command="bash native/cuda_run.sh", carry=[".devcuda"], timeout_s=600)
#
# Steps (all output to OUTDIR/log; OUTDIR defaults to $OUT, else /tmp/mcsharp-cuda-out):
#   1. configure ggml + CUDA (sm_$ARCH, GGML_NATIVE=OFF, FlashAttention kernels off, no fatbin compression),
#      build only the `ggml` target (ggml-base, ggml-cpu, ggml-cuda) with ninja, under a time limit;
#      test-backend-ops.cpp is compiled meanwhile with g++ (it needs only ggml)
#   2. mmid_mask_gpu on CUDA0, with and without GGML_CUDA_DISABLE_FUSION
#   3. test-backend-ops -b CUDA0 with masked ids: MUL_MAT_ID, MUL_MAT_ID_FUSION, MUL_MAT_ID_W4A8/W4A4
#   4. test-backend-ops -b CUDA0 stock (unmasked) MUL_MAT_ID* + MUL_MAT_VEC_FUSION, then MUL_MAT (what time allows)
#   5. native/tests/test_mul_mat_id_mask.c (the repo's CPU test) against this build
#   opt-in (STEPS=...,tbo_dup): MCSHARP_MASK_IDS=2, a repeated valid expert in one token (no masking); aborts in
#   MMQ with an illegal memory access, also expected of stock mmid.cu (see native/README.md)
# Results of the H200 runs: native/README.md, "CUDA run on an H200".
set -uo pipefail
T0=$(date +%s)
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
SRC="$(cd "${1:-$REPO/.devcuda/llama.cpp}" && pwd)"
OUTDIR="${2:-${OUT:-/tmp/mcsharp-cuda-out}}"
ARCH="${ARCH:-90}"
BUDGET_S="${BUDGET_S:-560}"          # whole script; the build gets what the tests do not need
TEST_RESERVE_S="${TEST_RESERVE_S:-100}"
JOBS="${JOBS:-$(nproc)}"
BLD="${BLD:-/tmp/mcsharp-cuda-build}"
mkdir -p "$OUTDIR" "$BLD"
LOG="$OUTDIR/log"
exec > >(tee -a "$LOG") 2>&1
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(date +%s) + T0 )); }
say() { echo "[$(el)s] $*"; }
RESULTS=()
result() { RESULTS+=("$*"); say "RESULT: $*"; }

say "host $(hostname) cores=$JOBS arch=sm_$ARCH src=$SRC"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -2
NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -n "$NVCC" ] || { say "FATAL: no nvcc"; exit 2; }
"$NVCC" --version | tail -1
CUDA_HOME="$("$NVCC" --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)$/\1/p' | head -1)"
[ -d "$CUDA_HOME" ] || CUDA_HOME="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
say "nvcc $NVCC, toolkit $CUDA_HOME"
cmake --version | head -1
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja

# ---- patches: apply each one that is not applied yet -----------------------------------------------------
ga() { (cd "$SRC" && GIT_CEILING_DIRECTORIES="$(dirname "$SRC")" git apply "$@"); }
if ! command -v git >/dev/null; then  # no git: plain patch(1), or trust the prepared tree
    if command -v patch >/dev/null; then
        ga() { local o=(); [ "$1" = -R ] && o+=(-R) && shift; [ "$1" = --check ] && o+=(--dry-run) && shift;
               [ "$1" = --whitespace=nowarn ] && shift; (cd "$SRC" && patch -p1 -s -f "${o[@]}" -i "$1"); }
    else
        ga() { [ "$1" = -R ]; }; say "WARNING: no git and no patch: assuming the tree is already patched"
    fi
fi
for p in "$HERE"/patches/*.patch "$HERE"/tests/test-backend-ops-masked-ids.patch; do
    if ga -R --check "$p" >/dev/null 2>&1; then
        say "patch $(basename "$p"): already applied"
    elif ga --whitespace=nowarn "$p"; then
        say "patch $(basename "$p"): applied now"
    else
        say "FATAL: patch $(basename "$p") neither applied nor applicable"; exit 2
    fi
done

INC=(-I"$SRC/ggml/include")
if [ -n "${LIBDIR_OVERRIDE:-}" ]; then  # test-stage dry run against an existing ggml build (no CUDA build)
    mkdir -p "$BLD" && ln -sfn "$LIBDIR_OVERRIDE" "$BLD/bin"
    g++ -O1 -std=c++17 -I"$SRC/ggml/include" -c "$SRC/tests/test-backend-ops.cpp" -o "$BLD/test-backend-ops.o" &
    TBO_PID=$!; BRC=0; BUILD_S=0
else
# ---- cuBLAS / libcuda: from the toolkit, else from the Python wheels (nvidia-cublas), else shims ----------
SHIM="$BLD/shim"; mkdir -p "$SHIM"
EXTRA_INC=""; LIBPATH=""; NO_VMM=OFF
if [ -z "${CUBLAS_ROOT:-}" ] && { [ -f "$CUDA_HOME/include/cublas_v2.h" ] || ls "$CUDA_HOME"/targets/*/include/cublas_v2.h >/dev/null 2>&1; }; then
    say "cuBLAS: toolkit $CUDA_HOME"
else
    CB="${CUBLAS_ROOT:-}"
    [ -n "$CB" ] || CB="$(python3 - <<'EOF' 2>/dev/null
import glob, site, sys
for r in site.getsitepackages() + sys.path:
    for g in sorted(glob.glob(r + "/nvidia/*/include/cublas_v2.h")):
        print(g.rsplit("/include/", 1)[0]); sys.exit(0)
EOF
)"
    [ -n "$CB" ] || { say "FATAL: no cublas_v2.h in the toolkit or python3's nvidia wheels"; exit 2; }
    say "cuBLAS: wheel $CB"
    for l in "$CB"/lib/libcublas*.so*; do b="$(basename "$l")"; ln -sf "$l" "$SHIM/$b"; ln -sf "$l" "$SHIM/${b%%.so*}.so"; done
    EXTRA_INC="$CB/include"; LIBPATH="$SHIM"
    export LD_LIBRARY_PATH="$CB/lib:$SHIM:${LD_LIBRARY_PATH:-}"
fi
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/targets/*/lib/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so \
        /usr/lib64/libcuda.so >/dev/null 2>&1; then
    DRV="$(ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\.so\.1 .*=> //p' | head -1)"
    [ -z "$DRV" ] && DRV="$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/local/nvidia/lib/libcuda.so.1 2>/dev/null | head -1)"
    if [ -n "$DRV" ]; then ln -sf "$DRV" "$SHIM/libcuda.so"; LIBPATH="$SHIM"; say "libcuda: $DRV"
    else NO_VMM=ON; say "libcuda.so not found: GGML_CUDA_NO_VMM=ON"; fi
fi

# ---- configure + build ggml (CPU + CUDA) -----------------------------------------------------------------
CMAKE_ARGS=(-G "$GEN" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_CUDA_COMPILER="$NVCC"
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_NATIVE=OFF
    -DGGML_CUDA_FA=OFF -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_COMPRESSION_MODE=none -DGGML_CUDA_NCCL=OFF
    -DGGML_CUDA_NO_VMM="$NO_VMM"
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF)
[ -n "$LIBPATH" ] && CMAKE_ARGS+=(-DCMAKE_LIBRARY_PATH="$LIBPATH")
[ -n "$EXTRA_INC" ] && CMAKE_ARGS+=("-DCMAKE_CUDA_FLAGS=-I$EXTRA_INC" "-DCMAKE_CXX_FLAGS=-I$EXTRA_INC")
[ -n "${EXTRA_CMAKE:-}" ] && CMAKE_ARGS+=($EXTRA_CMAKE)
say "cmake ${CMAKE_ARGS[*]}"
if ! cmake -S "$SRC" -B "$BLD" "${CMAKE_ARGS[@]}" >"$BLD/configure.log" 2>&1; then
    cp "$BLD/configure.log" "$OUTDIR/"; tail -n 40 "$BLD/configure.log"; say "FATAL: configure failed"; exit 1
fi
grep -E "CUDA Toolkit found|Using CMAKE_CUDA_ARCH|NCCL|cuBLAS|VMM|CUDA host compiler|The CUDA compiler" "$BLD/configure.log" | head
say "configured"
[ -n "${CONFIGURE_ONLY:-}" ] && exit 0

# test programs need only ggml's headers: compile them while ggml builds
( g++ -O2 -std=c++17 "${INC[@]}" -c "$SRC/tests/test-backend-ops.cpp" -o "$BLD/test-backend-ops.o" ) >"$BLD/tbo.log" 2>&1 &
TBO_PID=$!

BUILD_LIMIT=$(( $(left) - TEST_RESERVE_S ))
say "building target ggml with $JOBS jobs (limit ${BUILD_LIMIT}s)"
TB=$(date +%s)
timeout --signal=TERM --kill-after=10 "$BUILD_LIMIT" cmake --build "$BLD" --target ggml -j "$JOBS" >"$BLD/build.log" 2>&1
BRC=$?
BUILD_S=$(( $(date +%s) - TB ))
grep -E "error|FAILED" "$BLD/build.log" | head -n 30
tail -n 3 "$BLD/build.log"
result "build ggml+cuda rc=$BRC in ${BUILD_S}s ($(grep -c '\.cu\.o' "$BLD/build.log") CUDA objects)"
wait "$TBO_PID"; TRC=$?
[ $TRC -ne 0 ] && tail -n 20 "$BLD/tbo.log"
if [ $BRC -ne 0 ]; then
    cp "$BLD/build.log" "$OUTDIR/build.log" 2>/dev/null
    say "build did not finish: no test ran"; printf '%s\n' "${RESULTS[@]}"; exit 1
fi
fi  # LIBDIR_OVERRIDE
wait "$TBO_PID" 2>/dev/null
LIBDIR="$BLD/bin"
LINK=(-L"$LIBDIR" -lggml -lggml-base -Wl,-rpath,"$LIBDIR" -Wl,--allow-shlib-undefined)
g++ "$BLD/test-backend-ops.o" "${LINK[@]}" -pthread -o "$BLD/test-backend-ops" || say "test-backend-ops link failed"
cc -O2 -std=c11 "${INC[@]}" "$HERE/tests/mmid_mask_gpu.c" "${LINK[@]}" -lggml-cpu -lm -o "$BLD/mmid_mask_gpu" || say "mmid_mask_gpu build failed"
cc -O2 -std=c11 "${INC[@]}" "$HERE/tests/test_mul_mat_id_mask.c" "${LINK[@]}" -lggml-cpu -lm -o "$BLD/test_mul_mat_id_mask" || say "repo C test build failed"
ls -la "$BLD"/test-backend-ops "$BLD"/mmid_mask_gpu "$BLD"/test_mul_mat_id_mask 2>&1 | sed 's/^/  /'

# ---- tests ----------------------------------------------------------------------------------------------
run_t() {  # name limit cmd...  -> output in OUTDIR/<name>.log and the main log
    local name="$1" lim="$2"; shift 2
    local l; l=$(left); [ "$lim" -gt "$l" ] && lim=$l
    if [ "$lim" -lt 5 ]; then result "$name: NOT RUN (no time left)"; return; fi
    say "== $name (limit ${lim}s): $*"
    local t=$(date +%s)
    timeout --kill-after=5 "$lim" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t ))
    grep -E "FAIL|NaN|error|Error|abort|Assert" "$OUTDIR/$name.log" | head -n 40
    tail -n 4 "$OUTDIR/$name.log"
    local extra=""
    if grep -q "tests passed" "$OUTDIR/$name.log"; then
        extra="$(grep -E '^ *[0-9]+/[0-9]+ tests passed' "$OUTDIR/$name.log" | tr -s ' ' | tr '\n' ';')"
        extra="$extra fails=$(grep -c 'FAIL' "$OUTDIR/$name.log")"
    fi
    [ -z "$extra" ] && extra="$(tail -n 1 "$OUTDIR/$name.log")"
    result "$name rc=$rc ${dt}s $extra"
}
cd "$BLD"
STEPS="${STEPS:-mask,tbo_masked,tbo_stock,repo_c,mul_mat}"   # which test steps run, in this order
on() { [[ ",$STEPS," == *",$1,"* ]]; }
on mask && run_t mask_gpu_fused 60 env MMID_TRACE=1 ./mmid_mask_gpu gpu
on mask && run_t mask_gpu_nofusion 60 env MMID_TRACE=1 GGML_CUDA_DISABLE_FUSION=1 ./mmid_mask_gpu gpu
IDS_OPS="MUL_MAT_ID,MUL_MAT_ID_FUSION,MUL_MAT_ID_W4A8,MUL_MAT_ID_W4A4"
on tbo_masked && run_t tbo_masked 150 env MCSHARP_MASK_IDS=1 ./test-backend-ops test -b CUDA0 -o "$IDS_OPS"
on tbo_dup && run_t tbo_dup_ids 60 env MCSHARP_MASK_IDS=2 ./test-backend-ops test -b CUDA0 -o MUL_MAT_ID -p "n_mats=(512|1024),"
on tbo_stock && run_t tbo_stock_ids 150 ./test-backend-ops test -b CUDA0 -o "$IDS_OPS,MUL_MAT_VEC_FUSION"
on repo_c && run_t repo_c_test_cpu 30 ./test_mul_mat_id_mask
on mul_mat && run_t tbo_stock_mul_mat 300 ./test-backend-ops test -b CUDA0 -o MUL_MAT
# keep the tails of the long logs small enough to come back
for f in "$OUTDIR"/tbo_*.log; do [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15000000 ] && tail -c 15000000 "$f" >"$f.t" && mv "$f.t" "$f"; done
echo
say "SUMMARY (total $(el)s)"
printf '  %s\n' "${RESULTS[@]}"
