#!/usr/bin/env bash
# One prepared GPU check for a FRESH machine (python3 + torch + triton preinstalled, no network):
#   1. build/install pyquant (pip install -e ., CPU native module; the Triton kernels need no
#      build) with the preinstalled torch -- nothing is downloaded or reinstalled (--no-deps
#      --no-index) -- in the background, then check that the installed package finds its
#      kernels; the tests and the benchmark run from the source tree (PYTHONPATH), which needs
#      no native module;
#   2. the GPU tests of the Triton backend:  pytest -m gpu tests/test_triton.py tests/test_triton_sparse.py,
#      while PRECOMPILE processes (default 8) compile every autotuning candidate of the
#      benchmark into Triton's cache (python -m pyquant.bench_cuda --precompile-part i/P);
#   3. the CUDA benchmark (pyquant bench --device cuda, i.e. python -m pyquant.bench_cuda
#      $BENCH_ARGS) with whatever time is left.
# Everything lands in $OUT (or ./gpu_results): gpu_check.log (all output), install.log,
# junit.xml, bench_cuda.csv/.json and triton_autotune.json. Whole run: under 8 minutes.
#
#   bash benchmarks/gpu_check.sh                 # BUDGET_S=470 by default
#   PYQUANT_CUDA=ON bash benchmarks/gpu_check.sh # also build the CUDA native module
#   SKIP_INSTALL=1 bash benchmarks/gpu_check.sh   # source tree only
#   BENCH_ARGS="--ms 1,16 --shapes 7b" bash benchmarks/gpu_check.sh
set -euo pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-470}
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:---ms 1,16,128,1024,4096}
PRECOMPILE=${PRECOMPILE:-8}
export PYTHONUNBUFFERED=1
# The tuned configs of this run come back with the results (and warm later runs there).
export PYQUANT_CACHE_DIR="$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

ts() { date '+%H:%M:%S'; }
log() { echo "[$(ts) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

cd "$(dirname "$0")/.."
log "repo $(pwd), out $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF

# ---------------------------------------------------------------- 1. build and install
# In the background, while the tests run from the source tree: the GPU tests and the benchmark
# need no native module, and the build must not eat the time of both.
log "install in the background (PYQUANT_CUDA=${PYQUANT_CUDA:-OFF}, time box 200 s)"
if [ -n "${SKIP_INSTALL:-}" ]; then
    log "SKIP_INSTALL set: not installing"
    INSTALL_PID=""
else
    ( PYQUANT_CUDA=${PYQUANT_CUDA:-OFF} timeout 200 "$PY" -m pip install --no-deps \
          --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 ) &
    INSTALL_PID=$!
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF2'
import pyquant, pyquant._triton as t, pyquant.ops as ops
print("pyquant from", pyquant.__file__)
print("triton backend:", t.why_unavailable() or "available", "| kernels from", t.kernels_dir())
print("backends:", ops.backend_status())
print("dispatch:", ops.backend_table())
EOF2

# ---------------------------------------------------------------- 2. GPU tests
T=$(( $(left) - 170 ))  # leave the benchmark at least ~170 s
[ "$T" -gt 270 ] && T=270
[ "$T" -lt 60 ] && T=60
log "GPU tests (time box ${T} s)"
set +e
# Compiling Triton kernels, not running them, is what the GPU tests spend their time on, and
# it is single-threaded per process: spread the tests over processes when pytest-xdist is there.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 6"
PRE_PIDS=""
if [ "$PRECOMPILE" -gt 0 ]; then
    for i in $(seq 0 $((PRECOMPILE - 1))); do
        ( PYQUANT_TRITON_AUTOTUNE=0 timeout "$T" "$PY" -m pyquant.bench_cuda $BENCH_ARGS \
              --precompile-part "$i/$PRECOMPILE" >>"$OUT/precompile.log" 2>&1 ) &
        PRE_PIDS="$PRE_PIDS $!"
    done
fi
timeout "$T" "$PY" -m pytest -m gpu tests/test_triton.py tests/test_triton_sparse.py -q -rs --durations=15 $XDIST \
    -p no:cacheprovider --junitxml="$OUT/junit.xml"
TEST_RC=$?
log "GPU tests exit code $TEST_RC"
for p in $PRE_PIDS; do wait "$p"; done
log "precompile done: $(grep -h '^# precompile' "$OUT/precompile.log" 2>/dev/null | tr '\n' ' ')"
set -e

INSTALL_RC=skipped
if [ -n "$INSTALL_PID" ]; then
    set +e
    wait "$INSTALL_PID"
    INSTALL_RC=$?
    set -e
    log "install exit code $INSTALL_RC: $(tail -n 1 "$OUT/install.log")"
    if [ "$INSTALL_RC" -eq 0 ]; then
        # The installed package alone (no source tree on the path) finds its kernels.
        ( cd /tmp && env -u PYTHONPATH "$PY" -c "import pyquant, pyquant._triton as t; \
print('installed pyquant:', pyquant.__file__, '| kernels:', t.kernels_dir(), '|', \
t.why_unavailable() or 'triton backend available')" ) || log "installed package check failed"
    else
        tail -n 20 "$OUT/install.log" || true
    fi
fi

# ---------------------------------------------------------------- 3. benchmark
B=$(( $(left) - 15 ))
if [ "$B" -gt 30 ]; then
    log "CUDA benchmark (time box ${B} s; shapes not started within it are skipped)"
    set +e
    TB=$(( B - 70 )); [ "$TB" -lt 10 ] && TB=10
    timeout "$B" "$PY" -m pyquant.bench_cuda --out "$OUT" --time-budget "$TB" $BENCH_ARGS
    BENCH_RC=$?
    set -e
    log "benchmark exit code $BENCH_RC"
else
    BENCH_RC=124
    log "no time left for the benchmark"
fi

ls -la "$OUT"
log "done: tests rc=$TEST_RC, install rc=$INSTALL_RC, bench rc=$BENCH_RC"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
