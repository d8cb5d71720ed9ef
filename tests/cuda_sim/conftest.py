"""The CUDA simulator tests run only in a process started with ``NUMBA_ENABLE_CUDASIM=1``
(``tests/test_cuda_sim.py`` starts one): the variable must be set before ``numba.cuda`` is
first imported, and the ordinary test process imports the real ``numba.cuda``.

On a machine with a GPU, ``NBXENT_CUDA_TESTS=device python -m pytest tests/cuda_sim`` runs
the same tests on the GPU (same small tunables, a 2-SM stand-in for the launch geometry)."""

import os
import sys

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("NBXENT_CUDA_TESTS") != "device":
    collect_ignore_glob = ["test_*.py"]
elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # The simulator runs each GPU thread as a Python thread and polls them for barriers
    # while holding the GIL; a short switch interval makes barriers 3-4x faster.
    sys.setswitchinterval(5e-4)
    from tests.cudasim import one_shared_array_per_block

    one_shared_array_per_block()
