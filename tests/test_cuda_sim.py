"""Runs the CUDA kernels under the Numba CUDA simulator (``tests/cuda_sim/``).

``NUMBA_ENABLE_CUDASIM`` is read when ``numba.cuda`` is first imported, and this process
uses the real ``numba.cuda`` (for ``test_cuda_ptx``), so the simulator tests run in a child
``pytest`` with the variable set. Their output is shown when they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("numba.cuda", "ml_dtypes", "hypothesis"):  # what tests/cuda_sim needs
    pytest.importorskip(module)

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_kernels_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda_sim"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout[-30000:] + result.stderr[-5000:]
    assert result.returncode == 0, "simulator tests failed:\n" + output
    last = result.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, output
