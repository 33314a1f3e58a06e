#!/usr/bin/env bash
# Create (or reuse) .venv, install torch and the build tools, and build glm5 in it (editable, no build
# isolation, so the extension is compiled against exactly this torch). Sourced by main.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GLM5_VENV:-$ROOT/.venv}"
TORCH_SPEC="${GLM5_TORCH:-torch==2.13.0}"   # the CPU build on these machines; any torch >= 2.6 works

if [ ! -x "$VENV/bin/python" ]; then
  echo "[glm5] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" "scikit-build-core>=0.10" ninja "cmake>=3.26" numpy
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0   # CUTLASS headers: tests/cuda_sim checks the CUTLASS argument kernels
echo "[glm5] building the extension against torch $(python -c 'import torch; print(torch.__version__)')"
start=$(date +%s)
python -m pip install -q --no-build-isolation -e "$ROOT[test,bench]"
echo "[glm5] build took $(( $(date +%s) - start )) s"
