#!/usr/bin/env bash
# The GPU checks of `--device cuda` (docs/devices.md), as one script for a machine with an NVIDIA GPU and a CUDA
# build of torch: the device tests (GPTQ on the GPU packs exactly and matches the CPU's walk; whole conversions
# on the GPU are deterministic and agree with the CPU's), then bench_scale's Qwen3-30B-A3B shape, ours only, on
# the GPU. Logs and the bench JSON go to ${OUT:-out/gpu-check}; TESTS_TIMEOUT / BENCH_TIMEOUT (seconds) bound the two.
#   bash scripts/gpu_check.sh [LAYERS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-check}"
LAYERS="${1:-2}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
"$PY" -c "from mcsharp_gguf.runtime.llama import ensure_runtime; print(ensure_runtime(log=print).lib_dir)" >"$OUT/native-build.log" 2>&1
echo "native CPU libs: $(( $(date +%s) - t0 )) s (rc $?)" | tee -a "$OUT/gpu.txt"
timeout "${TESTS_TIMEOUT:-900}" "$PY" -m pytest tests/test_devices.py -q -p no:cacheprovider -rs --durations=5 2>&1 \
  | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-3600}" "$PY" scripts/bench_scale.py --shape qwen3-30b-a3b --layers "$LAYERS" --ours-only --device cuda --threads "$(nproc)" \
  --work "${BENCH_WORK:-/tmp/bench-scale}" --json "$OUT/bench-cuda.json" 2>"$OUT/bench-cuda.log" | tee "$OUT/bench-cuda.md"
tail -25 "$OUT/bench-cuda.log"
