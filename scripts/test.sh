#!/usr/bin/env bash
# README command 2 (and CI): set up (idempotent) and run the whole test suite, slow tests included.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
ruff check .
python -m pytest -q "$@"
