"""The CUDA simulator tests run only in a process started with ``NUMBA_ENABLE_CUDASIM=1``
(``tests/test_cuda_sim.py`` starts one): the variable must be set before ``numba.cuda`` is
first imported, and the ordinary test process imports the real ``numba.cuda``.

On a machine with a GPU, ``NBXENT_CUDA_TESTS=device python -m pytest tests/cuda_sim`` runs
the same tests on the GPU (same small tunables, a 2-SM stand-in for the launch geometry)."""

import os
import sys
import threading

import numpy as np


def one_shared_array_per_block() -> None:
    """Make the simulator's ``cuda.shared.array`` give every thread of a block the same array.

    numba-cuda 0.30.4's ``FakeCUDAShared.array`` looks the array up by call site and, when
    missing, makes one and stores it, without a lock. Its threads are Python threads, so two
    of them can both miss and each keep its own array: that thread's writes never reach the
    block and its reduction reads its own stale values. It happened once in CI (a loss of
    5.878 against 7.417); 32 threads asking at once got two arrays in 1 of 200 trials at this
    switch interval, 31 of 200 at 1 us (``test_shared_array_is_one_per_block``). Here the
    look-up and the store are one step under a lock; the call site is the caller's frame,
    as in the original (which read it from a full ``traceback.extract_stack``).
    """
    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()
    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or the simulator's error
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):  # as the original converts it
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("NBXENT_CUDA_TESTS") != "device":
    collect_ignore_glob = ["test_*.py"]
elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # The simulator runs each GPU thread as a Python thread and polls them for barriers
    # while holding the GIL; a short switch interval makes barriers 3-4x faster.
    sys.setswitchinterval(5e-4)
    one_shared_array_per_block()
