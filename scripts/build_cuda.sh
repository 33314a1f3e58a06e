#!/usr/bin/env bash
# Build glm5 with its CUDA kernels (sm_90a) against a CUDA build of torch in .venv-cuda, then check that
# it imports and reports the CUDA build. Needs the CUDA toolkit (nvcc), not a GPU: on a machine without
# one the kernels compile and link but cannot run. CI runs this whenever nvcc is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GLM5_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="${GLM5_CUDA_TORCH:-torch==2.14.1}"   # CUDA 13.0 build on these machines
ARCHS="${GLM5_CUDA_ARCHS:-9.0a}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" "scikit-build-core>=0.10" ninja "cmake>=3.26" numpy
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0   # CUTLASS/CuTe C++ headers only
python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'this torch is not a CUDA build')"
start=$(date +%s)
python -m pip install -q --no-build-isolation \
  -C build-dir=build/cuda -C cmake.define.GLM5_ENABLE_CUDA=ON -C "cmake.define.GLM5_CUDA_ARCHS=$ARCHS" "$ROOT"
echo "[glm5] CUDA build took $(( $(date +%s) - start )) s"
cd /   # import the installed wheel, not the source tree
python - <<'PY'
import glm5
info = glm5.build_info()
assert glm5.HAS_EXT, info.get("extension_error")
assert info["cuda_kernels"], "extension was built without its CUDA kernels"
print("[glm5] CUDA build ok: torch", info["torch"], "CUDA", info["torch_cuda"], "archs", info["cuda_archs"])
for op, backends in info["ops"].items():
    print(f"  glm5::{op:<24} {', '.join(backends) or 'no kernel'}")
missing = [op for op, backends in info["ops"].items() if "CUDA" not in backends]
if missing:  # every op must have a CUDA kernel in a CUDA build
    raise SystemExit(f"[glm5] FAIL: no CUDA kernel registered for {', '.join(missing)}")
PY
