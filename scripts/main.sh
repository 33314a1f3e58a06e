#!/usr/bin/env bash
# The main job on embedded defaults: set up, build, then run the DSA-vs-dense attention benchmark at
# GLM-5's per-layer shapes (results: benchmarks/results/). Extra arguments go to the benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
glm5 info
python "$ROOT/benchmarks/bench_dsa.py" "$@"
