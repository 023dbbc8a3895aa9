#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh: a .venv with CPU torch, the
# llama-cpp-python bindings (no C build), this package, then `mcsharp setup` (pinned gguf-py + the
# patched llama.cpp libs, cached by patch hash). Source it; it leaves the venv activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
STAMP=.venv/.mcsharp-bootstrap
WANT="$(cat pyproject.toml native/build.py | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  # The CPU wheel on this machine's disk; a bare `torch` requirement would pull a multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
  if ! python -c "import importlib.metadata as m; assert m.version('llama_cpp_python') == '0.3.36'" 2>/dev/null; then
    SDIST="$(python native/build.py sdist)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" python -m pip install -q "$SDIST"
  fi
  python -m pip install -q -e '.[dev]'
  echo "$WANT" > "$STAMP"
fi
mcsharp setup >&2
