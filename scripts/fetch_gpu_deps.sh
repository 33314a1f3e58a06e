#!/usr/bin/env bash
# Download, on a machine WITH network, the wheels that benchmarks/gpu_check.sh needs on a lent GPU
# machine that has none: the CUTLASS/CuTe C++ headers (nvidia-cutlass, pinned as in
# scripts/build_cuda.sh) and pytest with its pure-Python dependencies. gpu_check.sh installs them
# there only if they are missing. Pass the printed folder in the device run's `carry`.
#
#   bash scripts/fetch_gpu_deps.sh                    # into build/gpu_deps (ignored: build/)
#   bash scripts/fetch_gpu_deps.sh --with-build-tools # also cmake + ninja wheels (~+30 MB), for a
#                                                     # GPU machine whose cmake is older than 3.26
# Env: GPU_DEPS_DIR (default build/gpu_deps), GPU_PY_VERSION (the GPU machine's Python, default
# 3.12: device KINDS.md reads 3.12.3 there; pytest's markers pull tomli/exceptiongroup for < 3.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="${GPU_DEPS_DIR:-build/gpu_deps}"
PYV="${GPU_PY_VERSION:-3.12}"
WITH_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --with-build-tools) WITH_TOOLS=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "fetch_gpu_deps: unknown argument $arg" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

rm -rf "$DEST"
mkdir -p "$DEST"
# Fetch for the GPU machine's Python, binary wheels only (nothing gets built there).
PIPDL=("$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYV" -d "$DEST")
"${PIPDL[@]}" --no-deps nvidia-cutlass==4.2.0.0   # C++ headers only; its Python deps are not needed
"${PIPDL[@]}" pytest                                 # + iniconfig, pluggy, packaging, pygments
if [ "$WITH_TOOLS" = 1 ]; then
  "${PIPDL[@]}" --no-deps --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation py --abi none "cmake>=3.26" ninja
fi

# The wheel must carry the headers CMake looks for (cmake/glm5_cuda.cmake).
cutlass_whl=$(ls "$DEST"/nvidia_cutlass-4.2.0.0-*.whl)
"$PY" - "$cutlass_whl" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ("cutlass_library/source/include/cutlass/cutlass.h", "cutlass_library/source/include/cute/tensor.hpp")
missing = [n for n in need if n not in names]
sys.exit(f"fetch_gpu_deps: {sys.argv[1]} lacks {missing}" if missing else 0)
PY

echo "fetch_gpu_deps: wheels in $DEST:"
find "$DEST" -maxdepth 1 -type f -printf '%s %f\n' | sort -k2 | awk '{printf "  %8.1f KiB  %s\n", $1 / 1024, $2}'
bytes=$(du -sb "$DEST" | cut -f1)
echo "fetch_gpu_deps: total $(( bytes / 1024 / 1024 )) MiB (the device run carries at most 64 MiB with the working tree)"
if [ "$bytes" -gt $(( 48 * 1024 * 1024 )) ]; then
  echo "fetch_gpu_deps: WARNING: over 48 MiB; the working tree must fit in what is left" >&2
fi
echo "carry: $DEST"
