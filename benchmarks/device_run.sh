#!/usr/bin/env bash
# Everything a lent GPU session checks and times, in one call (docs/gpu.md, "Running on a
# lent GPU"). Run from the repository root on a machine with an NVIDIA GPU; reports go to
# $OUT (default /tmp/nbxent-device):
#   env.txt           the card, its clocks, the package versions
#   device_tests.txt  tests/cuda_sim run on the GPU (NBXENT_CUDA_TESTS=device)
#   tune.txt/.json    gpu_check.py --tune --tune-only: a few launch geometries, the best one
#   checks.txt/.json  gpu_check.py --skip-timings at that geometry (every dtype and option,
#                     2**31+ logits)
#   timings.txt/.json gpu_check.py --skip-checks --profile at that geometry (the table,
#                     latency, host profile of a small call)
# The tests and the checks compile many kernels (CPU-bound), so they run side by side; the
# timings run alone on the GPU. Time limits (seconds): TUNE_S, SWEEP_S, TESTS_S, CHECKS_S,
# TIMINGS_S.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nbxent-device}
export OUT
mkdir -p "$OUT"
py=${PYTHON:-python3}

# Wheels carried in .whl/ (numpy 2.4 on the lent machines: their numba-cuda 0.30.4 cannot
# compile a kernel under numpy 2.5, which removed np.row_stack) go first on the path.
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv
    nproc
    $py - <<'EOF'
import sys, numpy, numba, torch
print(sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__, "torch", torch.__version__)
for name in ("numba_cuda", "ml_dtypes", "cupy", "triton", "hypothesis", "xdist"):
    try:
        print(name, getattr(__import__(name), "__version__", "?"))
    except ImportError as e:
        print(name, "missing:", e)
from numba import cuda
cuda.detect()
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Fail fast (and spend no more device time) if numba-cuda cannot compile and launch here.
$py - >>"$OUT/env.txt" 2>&1 <<'EOF'
import numpy as np
from numba import cuda


def touch(a):
    a[cuda.grid(1)] = 1.0


k = cuda.jit("void(float32[::1])", launch_bounds=(256, 1))(touch)
a = cuda.device_array(256, np.float32)
k[1, 256](a)
assert (a.copy_to_host() == 1.0).all()
print("numba-cuda launch: ok")
EOF
probe=$?
tail -3 "$OUT/env.txt"
if [ $probe -ne 0 ]; then
    echo "numba-cuda cannot launch a kernel here: stopping"
    exit 2
fi

echo "== phase 1: choose the launch geometry on this card (gpu_check.py --tune)"
timeout "${TUNE_S:-75}" $py benchmarks/gpu_check.py --skip-checks --tune --tune-only --seconds "${SWEEP_S:-55}" \
    --name tune >/dev/null 2>&1
echo "tune rc=$?"
grep -A 20 "^sweep" "$OUT/tune.txt"
best=$(sed -n 's/^best: //p' "$OUT/tune.txt")
echo "geometry for the checks and the table: ${best:-the defaults}"
tunables=${best:+--tunables $best}

echo "== phase 2: tests/cuda_sim on the GPU, and gpu_check.py checks at that geometry, side by side"
NBXENT_CUDA_TESTS=device timeout "${TESTS_S:-110}" $py -m pytest -v -p no:cacheprovider -p no:benchmark \
    -W ignore::DeprecationWarning -n 12 tests/cuda_sim >"$OUT/device_tests.txt" 2>&1 &
tests=$!
timeout "${CHECKS_S:-100}" $py benchmarks/gpu_check.py --skip-timings $tunables --name checks >/dev/null 2>&1
echo "checks rc=$?"
grep -E "FAIL|check\(s\) failed|Error" "$OUT/checks.txt" | head -40
wait $tests
echo "device tests rc=$?"
grep -cE " PASSED " "$OUT/device_tests.txt"
grep -E "^(FAILED|ERROR)| FAILED |passed|failed" "$OUT/device_tests.txt" | tail -30

echo "== phase 3: the table, latency and a host profile, alone on the GPU"
timeout "${TIMINGS_S:-75}" $py benchmarks/gpu_check.py --skip-checks --profile $tunables --name timings
echo "timings rc=$?"
