#!/usr/bin/env bash
# Everything a lent GPU session checks and times, in one call (docs/gpu.md, "Running on a
# lent GPU"). Run from the repository root on a machine with an NVIDIA GPU; reports go to
# $OUT (default /tmp/nbxent-device):
#   env.txt           the card, its clocks, the package versions
#   device_tests.txt  tests/cuda_sim run on the GPU (NBXENT_CUDA_TESTS=device)
#   checks.log/.json  benchmarks/gpu_check.py --skip-timings (every dtype and option, 2**31+ logits)
#   timings.txt/.json benchmarks/gpu_check.py --skip-checks --tune --profile (geometries,
#                     the table with the best, latency, host profile of a small call)
# Phase 1 compiles many kernels (CPU-bound), so the tests and the checks run side by side;
# phase 2 times alone on the GPU. Time limits: TESTS_S, CHECKS_S, TIMINGS_S, SWEEP_S seconds.
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

echo "== phase 1: tests/cuda_sim on the GPU, and gpu_check.py checks, side by side"
NBXENT_CUDA_TESTS=device timeout "${TESTS_S:-160}" $py -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests/cuda_sim \
    >"$OUT/device_tests.txt" 2>&1 &
tests=$!
timeout "${CHECKS_S:-170}" $py benchmarks/gpu_check.py --skip-timings --name checks >"$OUT/checks.log" 2>&1
echo "checks rc=$?"
grep -E "FAIL|check\(s\) failed|Error" "$OUT/checks.log" | head -40
wait $tests
echo "device tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/device_tests.txt" | tail -30

echo "== phase 2: timings, alone on the GPU"
timeout "${TIMINGS_S:-200}" $py benchmarks/gpu_check.py --skip-checks --tune --profile --seconds "${SWEEP_S:-110}" \
    --name timings
echo "timings rc=$?"
