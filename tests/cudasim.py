"""What the tests that run under the Numba CUDA simulator need from it (imported only in a
process started with ``NUMBA_ENABLE_CUDASIM=1``: ``tests/cuda_sim`` and the simulated GPU
path of ``tests/test_linear.py``)."""

import sys
import threading

import numpy as np


def one_shared_array_per_block() -> None:
    """Make the simulator's ``cuda.shared.array`` give every thread of a block the same array.

    numba-cuda 0.30.4's ``FakeCUDAShared.array`` looks the array up by call site and, when
    missing, makes one and stores it, without a lock. Its threads are Python threads, so two
    of them can both miss and each keep its own array: that thread's writes never reach the
    block and its reduction reads its own stale values. It happened once in CI (a loss of
    5.878 against 7.417); 32 threads asking at once got two arrays in 1 of 200 trials at the
    switch interval of tests/cuda_sim (0.5 ms), 31 of 200 at 1 us
    (``test_shared_array_is_one_per_block``). Here the look-up and the store are one step
    under a lock; the call site is the caller's frame, as in the original (which read it from
    a full ``traceback.extract_stack``).
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
