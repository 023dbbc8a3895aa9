#!/usr/bin/env bash
# README command 1: set up (idempotent) and run the main job on the embedded (specialised) fixture.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
mcsharp demo "$@"
