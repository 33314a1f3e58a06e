#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CPU; CUDA tests run too when a GPU is present).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sparse_mla -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
glm5 info
cd "$ROOT"
python -m pytest -q "$@"
