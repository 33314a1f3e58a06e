#!/usr/bin/env bash
# The main job on embedded defaults, end to end: set up and build; pretrain the debug GLM-5 on the
# Python standard library's sources through every stage (dense pretraining, context extension, DSA
# dense warm-up, DSA sparse adaptation) with validation loss against the corpus's unigram entropy;
# generate a sample from the trained model; and measure DSA against dense attention at GLM-5's
# per-layer shapes. Run folder: runs/main (GLM5_RUN to change); a second call resumes the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
RUN="${GLM5_RUN:-$ROOT/runs/main}"
glm5 info

echo "== 1/3 pretraining (debug preset, all stages) -> $RUN =="
resume=()
[ -d "$RUN/checkpoints" ] && resume=(--resume)
glm5 pretrain --preset debug --out "$RUN" "${resume[@]}"

echo "== 2/3 a sample from the trained model =="
glm5 generate --checkpoint "$RUN" --prompt "def fibonacci(n):" --max-new-tokens 64 --temperature 0

echo "== 3/3 DSA vs dense attention at GLM-5 shapes (quick run; full: python benchmarks/bench_dsa.py) =="
python "$ROOT/benchmarks/bench_dsa.py" --quick "$@"
