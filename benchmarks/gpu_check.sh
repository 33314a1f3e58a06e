#!/usr/bin/env bash
# The one GPU check for a lent H200 machine (no network there): build glm5 with its CUDA kernels for
# sm_90a, run the cuda-marked op tests, run benchmarks/bench_gpu.py; everything logged under $OUT.
#
#   here, once (network):  bash scripts/fetch_gpu_deps.sh          -> build/gpu_deps (CUTLASS, pytest)
#   there (device `run`):  command "bash benchmarks/gpu_check.sh", carry ["build/gpu_deps"]
#
# Stages, each under its own `timeout`, all inside GPU_CHECK_BUDGET_S (default 470 s):
#   env    nvidia-smi, python/torch/nvcc/cmake versions; stops (exit 3) when no GPU is visible
#   deps   the carried wheels into build/gpu_site (put on PYTHONPATH), only for what is missing
#   build  pip install --target build/gpu_site --no-build-isolation, CUDA on, 9.0a only   (<= 300 s)
#   tests  pytest -m cuda, one process per tests/ops/test_cuda_*.py, so that a sticky CUDA error in
#          one file cannot fail the others; their junit xml merged into one              (<= 180 s)
#   bench  benchmarks/bench_gpu.py (GLM-5 shapes; GPU_CHECK_QUICK=1 for --quick)        (<= 120 s)
# On a warm machine build/gpu and build/gpu_site are still there: a rerun builds incrementally.
# Files in $OUT (default ./gpu_check_out; a device run brings back 8 at most): gpu_check.log (this
# output), build.log, tests.log, junit_cuda.xml (one testsuite per file), bench_gpu.json, summary.json.
# Exit: 0 build ok, all tests passed, every benchmark ran with its check ok; 1 otherwise (failed
# tests, a stage out of time, benchmark errors or mismatches); 2 the build or the import failed;
# 3 no GPU (GPU_CHECK_ALLOW_NO_GPU=1 goes on: a rehearsal of build + tests on a machine without one).
# Knobs: PYTHON (default: the first python3/python that imports torch), OUT, GPU_CHECK_BUDGET_S,
# GPU_CHECK_BUILD_S / GPU_CHECK_TESTS_S / GPU_CHECK_BENCH_S (stage caps), GPU_CHECK_STAGES (default
# "build,tests,bench"), GPU_CHECK_QUICK=1, GPU_CHECK_PYTEST_ARGS (default "-v -rfE --maxfail=30"),
# GPU_CHECK_FORCE_WHEELS=1 (install the carried wheels even when present), GLM5_GIT_COMMIT (recorded
# in the results: the machine's copy of the tree has no .git).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

BUDGET="${GPU_CHECK_BUDGET_S:-470}"
STAGES=",${GPU_CHECK_STAGES:-build,tests,bench},"
PYTEST_ARGS="${GPU_CHECK_PYTEST_ARGS:--v -rfE --maxfail=30}"
SITE="$ROOT/build/gpu_site"
DEPS="$ROOT/build/gpu_deps"
SCRATCH="$(mktemp -d)"
BUILD_RESULT="not run"
TESTS_RESULT="not run"
BENCH_RESULT="not run"
EXIT=0

log() { printf '[%s +%3ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
die() { log "FATAL: $2"; EXIT=$1; exit "$1"; }

# Seconds a stage may take: its cap, less what the later stages need (reserve), never past BUDGET.
stage_limit() {
  local cap=$1 reserve=$2 left
  left=$((BUDGET - SECONDS - reserve))
  if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

# run_stage NAME LIMIT LOGFILE|- CMD...: run under timeout (the whole process group is killed), set STAGE_RC.
run_stage() {
  local name=$1 lim=$2 logf=$3 t=$SECONDS rc=0
  shift 3
  log "[$name] start, limit ${lim}s: $*"
  if [ "$logf" = - ]; then
    timeout --kill-after=15 "$lim" "$@" || rc=$?
  else
    timeout --kill-after=15 "$lim" "$@" >>"$logf" 2>&1 || rc=$?
  fi
  STAGE_RC=$rc
  if ((rc == 124 || rc == 137)); then
    log "[$name] TIMED OUT after $((SECONDS - t))s (limit ${lim}s)"
  else
    log "[$name] rc=$rc after $((SECONDS - t))s"
  fi
}

# Cap a log at 15 MiB (a device run brings back files of 16 MiB at most): keep its head and tail.
cap_file() {
  local f=$1 max=$((15 * 1024 * 1024))
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$max" ]; then
    { head -c $((max / 3)) "$f"; printf '\n... [cut by gpu_check.sh] ...\n'; tail -c $((max / 2)) "$f"; } >"$f.cut"
    mv "$f.cut" "$f"
  fi
}

write_summary() {
  "$PY" - "$OUT" "$BUILD_RESULT" "$TESTS_RESULT" "$BENCH_RESULT" "$EXIT" "$SECONDS" <<'PY' || true
import glob, json, os, sys
import xml.etree.ElementTree as ET
out, build, tests, bench, code, secs = sys.argv[1:7]
s = {"build": build, "tests": tests, "bench": bench, "exit_code": int(code), "seconds": int(secs),
     "git_commit": os.environ.get("GLM5_GIT_COMMIT"), "junit": {}}
for f in sorted(glob.glob(os.path.join(out, "junit_*.xml"))):
    try:
        root = ET.parse(f).getroot()
        for suite in [root] if root.tag == "testsuite" else list(root):
            s["junit"][suite.get("name")] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except Exception as e:
        s["junit"][os.path.basename(f)] = {"unreadable": str(e)}
bj = os.path.join(out, "bench_gpu.json")
if os.path.exists(bj):
    try:
        b = json.load(open(bj))
        s["bench_summary"] = b.get("summary")
        s["bench_rows"] = [{k: r.get(k) for k in ("bench", "case", "ms", "tflops", "baseline", "baseline_ms", "ratio",
                            "target", "met", "error", "bench_error", "skipped")} | {"check_ok": (r.get("check") or {}).get("ok")}
                           for r in b.get("rows", [])]
    except Exception as e:
        s["bench_summary"] = {"unreadable": str(e)}
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
}

finish() {
  local rc=$?
  set +e
  ((EXIT == 0 && rc != 0)) && EXIT=$rc
  log "== summary: build: $BUILD_RESULT | tests: $TESTS_RESULT | bench: $BENCH_RESULT | exit $EXIT"
  [ -n "${PY:-}" ] && write_summary
  for f in "$OUT"/*.log; do cap_file "$f"; done
  rm -rf "$SCRATCH"
  log "files in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' | tr -s ' ')"
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null
  exit "$EXIT"
}
trap finish EXIT

# ---- env ---------------------------------------------------------------------------------------
log "== glm5 GPU check in $ROOT (budget ${BUDGET}s), output in $OUT"
commit="${GLM5_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
export GLM5_GIT_COMMIT="$commit"
log "commit: $commit"
log "host: $(uname -srm), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2 " GiB"}') memory, disk free $(df -h . | awk 'NR==2 {print $4}')"
if command -v nvidia-smi >/dev/null; then
  timeout 30 nvidia-smi || log "nvidia-smi failed"
else
  log "nvidia-smi: not found"
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python /opt/torch/.venv/bin/python3; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" >/dev/null 2>&1; then
      PY="$(command -v "$c")"
      break
    fi
  done
fi
[ -n "$PY" ] || die 2 "no python that imports torch (set PYTHON)"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

"$PY" - <<'PY'
import importlib.metadata as md, sys, torch
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
for name in ("scikit-build-core", "cmake", "ninja", "pybind11", "pytest", "nvidia-cutlass", "numpy"):
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        v = "missing"
    print(f"  {name} {v}")
PY
log "nvcc: $(command -v nvcc || echo missing) $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || true)"
log "cmake: $(command -v cmake || echo missing) $(cmake --version 2>/dev/null | head -1 || true); ninja: $(ninja --version 2>/dev/null || echo missing)"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" = 1 ]; then
    log "no GPU visible: going on (GPU_CHECK_ALLOW_NO_GPU=1): CUDA tests will skip, bench_gpu.py will refuse"
  else
    die 3 "no GPU: torch.cuda.is_available() is False on this machine; nothing to check (GPU_CHECK_ALLOW_NO_GPU=1 rehearses build + tests)"
  fi
fi

# ---- deps --------------------------------------------------------------------------------------
log "== deps (carried wheels in ${DEPS#"$ROOT"/}, installed into ${SITE#"$ROOT"/} only when missing)"
mkdir -p "$SITE"
force="${GPU_CHECK_FORCE_WHEELS:-0}"
have_cutlass() {  # the pinned CUTLASS with its C++ headers, where cmake/glm5_cuda.cmake looks
  "$PY" - <<'PY'
import importlib.metadata as md, importlib.util as u, os, sys
s = u.find_spec("cutlass_library")
ok = s is not None and os.path.isfile(os.path.join(s.submodule_search_locations[0], "source", "include", "cutlass", "cutlass.h"))
try:
    ok = ok and md.version("nvidia-cutlass") == "4.2.0.0"
except md.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}
have_pytest() { "$PY" -c "import sys, pytest; sys.exit(0 if int(pytest.__version__.split('.')[0]) >= 8 else 1)" 2>/dev/null; }
have_cmake() {  # CMakeLists.txt needs 3.26; scikit-build-core takes the cmake Python package's or PATH's
  local exe v
  for exe in "$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null)" cmake; do
    v=$("$exe" --version 2>/dev/null | head -1 | grep -o '[0-9][0-9.]*' || true)
    [ -n "$v" ] && [ "$(printf '%s\n3.26\n' "$v" | sort -V | head -1)" = 3.26 ] && return 0
  done
  return 1
}
PIP=("$PY" -m pip install -q --no-index --upgrade --no-compile --target "$SITE")
if [ "$force" = 1 ] || ! have_cutlass; then
  whls=("$DEPS"/nvidia_cutlass-4.2.0.0-*.whl)
  whl=${whls[0]}
  [ -f "$whl" ] || die 2 "nvidia-cutlass 4.2.0.0 is missing and not carried: run scripts/fetch_gpu_deps.sh here and carry build/gpu_deps"
  log "installing ${whl#"$ROOT"/}"
  timeout 120 "${PIP[@]}" --no-deps "$whl"
  have_cutlass || die 2 "nvidia-cutlass installed into $SITE but its headers are still not found"
fi
if [ "$force" = 1 ] || ! have_pytest; then
  if ls "$DEPS"/pytest-*.whl >/dev/null 2>&1; then
    log "installing pytest from ${DEPS#"$ROOT"/}"
    timeout 120 "${PIP[@]}" --find-links "$DEPS" pytest || log "pytest install failed"
  else
    log "pytest >= 8 is missing and not carried: the tests stage will fail"
  fi
fi
if ! have_cmake; then
  if ls "$DEPS"/cmake-*.whl >/dev/null 2>&1; then
    log "cmake >= 3.26 missing: installing the carried cmake/ninja wheels"
    timeout 120 "${PIP[@]}" --no-deps "$DEPS"/cmake-*.whl "$DEPS"/ninja-*.whl || log "cmake install failed"
  else
    log "cmake >= 3.26 not found (fetch_gpu_deps.sh --with-build-tools carries one); the build may fail"
  fi
fi
"$PY" -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print('cutlass headers:', os.path.join(s.submodule_search_locations[0], 'source', 'include'))"

# ---- build -------------------------------------------------------------------------------------
if [[ $STAGES == *,build,* ]]; then
  log "== build (CUDA on, archs 9.0a, build dir build/gpu, $(nproc) parallel jobs)"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  export CMAKE_BUILD_PARALLEL_LEVEL
  lim=$(stage_limit "${GPU_CHECK_BUILD_S:-300}" 120)
  ((lim >= 30)) || die 2 "no time left for the build (${lim}s)"
  run_stage build "$lim" "$OUT/build.log" "$PY" -m pip install -v --no-index --no-deps --no-build-isolation \
    --upgrade --target "$SITE" -C build-dir=build/gpu -C cmake.define.GLM5_ENABLE_CUDA=ON \
    -C cmake.define.GLM5_CUDA_ARCHS=9.0a "$ROOT"
  if ((STAGE_RC != 0)); then
    BUILD_RESULT="FAILED (rc $STAGE_RC)"
    log "build failed; first errors in build.log:"
    grep -n -E 'error|Error|FAILED' "$OUT/build.log" | grep -v -E 'Werror|error_|_error|errors\.h' | head -40 || true
    log "last lines of build.log:"
    tail -n 40 "$OUT/build.log"
    EXIT=2
    exit 2
  fi
  grep -E '^\[[0-9]+/[0-9]+\]' "$OUT/build.log" | tail -3 || true
fi
# The installed glm5 (not the source tree) must import with its CUDA kernels; report which of the
# project's runtime dependencies (tokenizers, safetensors, ...) `import glm5, glm5.ops` pulls in.
if ! (cd "$SCRATCH" && timeout 120 "$PY" - "$SITE") <<'PY'
import sys
site = sys.argv[1]
import torch  # noqa: F401
before = set(sys.modules)
import glm5, glm5.ops  # noqa: E401
info = glm5.build_info()
assert glm5.__file__.startswith(site), f"imported glm5 from {glm5.__file__}, not from {site}"
assert glm5.HAS_EXT, f"extension did not load: {info.get('extension_error')}"
assert info["cuda_kernels"], "extension was built without its CUDA kernels"
print(f"glm5 {info['glm5']} from {glm5.__file__}: built against torch {info['built_against_torch']}, "
      f"CUDA archs {info['cuda_archs']}, nvcc {info['nvcc']}")
for op, b in info["ops"].items():
    print(f"  glm5::{op:<22} {', '.join(b) or 'no kernel'}")
deps = ("tokenizers", "safetensors", "tqdm", "tensorboard", "matplotlib", "numpy", "transformers")
extra = [m for m in deps if m in sys.modules and m not in before]
print("runtime dependencies that `import glm5, glm5.ops` imports (beyond torch's own):", extra or "none")
PY
then
  BUILD_RESULT="FAILED (built, but glm5 does not import with CUDA kernels)"
  EXIT=2
  exit 2
fi
if [[ $STAGES == *,build,* ]]; then BUILD_RESULT="ok"; else BUILD_RESULT="skipped (GPU_CHECK_STAGES); installed glm5 imports"; fi

# ---- tests -------------------------------------------------------------------------------------
if [[ $STAGES == *,tests,* ]]; then
  files=(tests/ops/test_cuda_*.py)
  total=$(stage_limit "${GPU_CHECK_TESTS_S:-180}" 60)
  log "== tests: pytest -m cuda ${PYTEST_ARGS} on ${files[*]} (${total}s in all)"
  t_start=$SECONDS
  TESTS_RESULT=""
  for i in "${!files[@]}"; do
    f=${files[$i]}
    base=$(basename "$f" .py)
    # All that is left, less 20 s for each file after this one (but at least a fair share): a slow
    # file may run long, a hung one leaves the others some time. (A pytest killed by its timeout
    # writes no junit; -v in tests.log then names the test it was in.)
    after=$((${#files[@]} - i - 1))
    left=$((total - (SECONDS - t_start)))
    lim=$((left - 20 * after))
    ((lim >= left / (after + 1))) || lim=$((left / (after + 1)))
    if ((lim < 15)); then
      log "[tests:$base] skipped: out of time"
      TESTS_RESULT+="$base: skipped (time); "
      EXIT=1
      continue
    fi
    part="$SCRATCH/$base.log"
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
    run_stage "tests:$base" "$lim" "$part" "$PY" -m pytest -m cuda $PYTEST_ARGS -p no:cacheprovider \
      -o junit_suite_name="$base" --junitxml="$SCRATCH/junit_$base.xml" "$f"
    { echo "==== $f (rc $STAGE_RC)"; cat "$part"; } >>"$OUT/tests.log"
    grep -E '^(FAILED|ERROR) ' "$part" | head -20 || true
    tail -n 2 "$part"
    # One junit file for all test files (a device run brings back 8 files at most), merged after each.
    "$PY" - "$OUT/junit_cuda.xml" "$SCRATCH"/junit_*.xml <<'PY' || log "junit merge failed"
import sys, xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for part in sys.argv[2:]:
    try:
        r = ET.parse(part).getroot()
        root.extend([r] if r.tag == "testsuite" else list(r))
    except Exception as e:  # a pytest killed by its timeout writes no xml
        ET.SubElement(root, "testsuite", name=part, tests="0", failures="0", errors="1", skipped="0", message=str(e))
ET.ElementTree(root).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
PY
    case $STAGE_RC in
      0) TESTS_RESULT+="$base: passed; " ;;
      124 | 137) TESTS_RESULT+="$base: TIMED OUT; " ;;
      1) TESTS_RESULT+="$base: FAILED; " ;;
      5) TESTS_RESULT+="$base: no tests collected; " ;;
      *) TESTS_RESULT+="$base: pytest rc $STAGE_RC; " ;;
    esac
    ((STAGE_RC == 0)) || EXIT=1
  done
fi

# ---- bench -------------------------------------------------------------------------------------
if [[ $STAGES == *,bench,* ]]; then
  lim=$(stage_limit "${GPU_CHECK_BENCH_S:-120}" 5)
  if ((lim < 30)); then
    log "== bench: skipped, ${lim}s left"
    BENCH_RESULT="skipped (time)"
    EXIT=1
  else
    quick=()
    [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)
    log "== bench: benchmarks/bench_gpu.py ${quick[*]}"
    run_stage bench "$lim" - "$PY" benchmarks/bench_gpu.py "${quick[@]}" --budget-s $((lim - 25)) \
      --out-json "$OUT/bench_gpu.json"
    case $STAGE_RC in
      0) BENCH_RESULT="ran" ;;
      124 | 137) BENCH_RESULT="TIMED OUT (bench_gpu.json holds the benchmarks that finished)" ;;
      *) BENCH_RESULT="rc $STAGE_RC" ;;
    esac
    ((STAGE_RC == 0)) || EXIT=1
    if [ -f "$OUT/bench_gpu.json" ]; then
      "$PY" - "$OUT/bench_gpu.json" <<'PY' || EXIT=1
import json, sys
b = json.load(open(sys.argv[1]))
s = b.get("summary", {})
print(f"bench: targets met {s.get('targets_met')}/{s.get('targets_total')}, checks failed {len(s.get('checks_failed', []))}, "
      f"errors {len(s.get('errors', []))}, skipped {len(s.get('skipped', []))}")
for r in b["rows"]:
    if r.get("target"):
        tf = "-" if r.get("tflops") is None else f"{r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x {r.get('baseline')}"
        print(f"  {r['bench']:<16} {r['case']:<26} {tf:>28}  {ratio:<28} target {r['target']:<28} "
              f"{'MET' if r.get('met') else 'not met'}  check {'ok' if (r.get('check') or {}).get('ok') else 'FAILED'}")
sys.exit(1 if s.get("checks_failed") or s.get("errors") or s.get("skipped") else 0)
PY
    fi
  fi
fi
