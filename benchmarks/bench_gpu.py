"""GPU benchmarks: nbxent's CUDA kernels against PyTorch on the same GPU, and their bandwidth.

The grid is the CPU suite's (``_common``). Arrays are PyTorch CUDA tensors when a CUDA build of
PyTorch is installed, CuPy arrays otherwise (CuPy has no bfloat16: those cases are skipped).
Every ``setup`` raises ``NotImplementedError`` (asv: skipped) when there is no usable GPU, no
CUDA array library, or nbxent's CUDA backend cannot be imported; nothing here touches CUDA at
import time.

Device work is asynchronous, so every timed call ends with a device-wide synchronize, and
every ``setup`` ends with one so that no earlier work is counted. The bandwidth figures are
timed with CUDA events instead, which measure only the device's time.
"""

from __future__ import annotations

import functools
import importlib
import statistics

import numpy as np

from . import _common
from ._common import DTYPES, OPS, OPTIONS, SHAPES
from .bench_cpu import nbxent_call, torch_call

GRID = [SHAPES, DTYPES, OPTIONS, OPS]
GRID_NAMES = ["shape", "dtype", "options", "op"]


class _TorchDevice:
    """PyTorch CUDA tensors on the current device."""

    def __init__(self):
        self.torch = _common.import_torch()
        if not self.torch.cuda.is_available():
            raise NotImplementedError("this PyTorch build has no CUDA")

    def put(self, a: np.ndarray):
        return _common.to_torch(a, self.torch).cuda()

    def empty_like(self, a):
        return self.torch.empty_like(a)

    def copy(self, dst, src) -> None:
        dst.copy_(src)

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def event_pair(self):
        return self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)


class _CupyDevice:
    """CuPy arrays on the current device."""

    def __init__(self):
        import cupy

        self.cupy = cupy

    def put(self, a: np.ndarray):
        if a.dtype.name == "bfloat16":
            raise NotImplementedError("CuPy has no bfloat16; install a CUDA build of PyTorch")
        return self.cupy.asarray(a)

    def empty_like(self, a):
        return self.cupy.empty_like(a)

    def copy(self, dst, src) -> None:
        self.cupy.copyto(dst, src)

    def synchronize(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def event_pair(self):
        return self.cupy.cuda.Event(), self.cupy.cuda.Event()


@functools.lru_cache(maxsize=1)
def device():
    """The CUDA array library to benchmark with (PyTorch first, then CuPy).

    Raises
    ------
    NotImplementedError
        No CUDA GPU, no CUDA array library, or nbxent's CUDA backend is not importable.
    """
    if _common.cuda_gpu_count() == 0:
        raise NotImplementedError("no CUDA GPU (the driver reports none)")
    try:
        importlib.import_module("nbxent._backend_cuda")
    except ImportError as e:
        raise NotImplementedError(f"nbxent's CUDA backend is not importable: {e}") from e
    try:
        return _TorchDevice()
    except NotImplementedError:
        pass
    try:
        return _CupyDevice()
    except ImportError as e:
        raise NotImplementedError("no CUDA array library: install cupy-cuda12x or a CUDA build of torch") from e


@functools.lru_cache(maxsize=1)
def device_inputs(shape: str, dtype: str, options: str):
    """Seeded logits, targets and option keywords on the GPU, made once per process."""
    dev = device()
    logits = dev.put(_common.make_logits(shape, dtype))
    targets = dev.put(_common.make_targets(shape))
    kwargs = _common.options(options, _common.parse_shape(shape)[1])
    if "weight" in kwargs:
        kwargs["weight"] = dev.put(kwargs["weight"].astype(_common.np_dtype(dtype)))
    return logits, targets, kwargs


def event_seconds(dev, fn, repeats: int, before=None) -> float:
    """Median device time of ``fn`` between two CUDA events; ``before`` runs untimed first."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = dev.event_pair()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(_elapsed_ms(start, end) / 1e3)
    return statistics.median(times)


def _elapsed_ms(start, end) -> float:
    if hasattr(start, "elapsed_time"):  # PyTorch
        return start.elapsed_time(end)
    import cupy

    return cupy.cuda.get_elapsed_time(start, end)


class _GpuCase:
    """Fresh logits for "in place" (a working copy refilled from the pristine one, untimed)."""

    def _prepare(self, shape, dtype, options, op):
        self.dev = device()
        pristine, targets, kwargs = device_inputs(shape, dtype, options)
        if op == "forward+backward in place":
            work = getattr(self, "_work", None)
            if work is None or work.shape != pristine.shape or work.dtype != pristine.dtype:
                work = self._work = self.dev.empty_like(pristine)
            self.logits = work
        else:
            self.logits = pristine
        self.pristine = pristine
        return targets, kwargs

    def _refill(self, op) -> None:
        if op == "forward+backward in place":
            self.dev.copy(self.logits, self.pristine)
        self.dev.synchronize()


class NbxentCUDA(_GpuCase):
    """nbxent's CUDA kernels over the whole grid."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    warmup_time = 0  # setup's warm-up call takes its place

    def setup(self, shape, dtype, options, op):
        targets, kwargs = self._prepare(shape, dtype, options, op)
        self.call = nbxent_call(op, self.logits, targets, kwargs)
        _common.warm_up_once((shape, dtype, options, op), self.call)
        self._refill(op)
        self.repeat = (10, 200, 2.0)

    def time_nbxent(self, shape, dtype, options, op):
        self.call()
        self.dev.synchronize()


class TorchCUDA:
    """PyTorch's ``F.cross_entropy`` (+ autograd) on the same GPU; no in-place gradient."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    warmup_time = 0

    def setup(self, shape, dtype, options, op):
        if op == "forward+backward in place":
            raise NotImplementedError("PyTorch computes no gradient in place")
        self.dev = device()
        if not isinstance(self.dev, _TorchDevice):
            raise NotImplementedError("PyTorch with CUDA is not installed")
        torch = self.dev.torch
        x, targets, kwargs = device_inputs(shape, dtype, options)
        self.call = torch_call(torch, op, x, targets, kwargs)
        _common.warm_up_once((shape, dtype, options, op), self.call)
        self.dev.synchronize()
        self.repeat = (10, 200, 2.0)

    def time_torch(self, shape, dtype, options, op):
        self.call()
        self.dev.synchronize()


class BandwidthCUDA(_GpuCase):
    """GB/s of nbxent on the GPU and the fraction of a device-to-device copy's, both timed
    with CUDA events in the same setup; bytes are counted as in ``bench_cpu.Bandwidth``."""

    params = [SHAPES, DTYPES, ["forward", "forward+backward in place"]]
    param_names = ["shape", "dtype", "op"]
    timeout = 300

    def setup(self, shape, dtype, op):
        targets, kwargs = self._prepare(shape, dtype, "plain", op)
        call = nbxent_call(op, self.logits, targets, kwargs)
        call()  # warm-up
        seconds = event_seconds(self.dev, call, 21, before=lambda: self._refill(op))
        dst = self.dev.empty_like(self.pristine)
        copy_seconds = event_seconds(self.dev, lambda: self.dev.copy(dst, self.pristine), 21)
        nbytes = int(np.prod(_common.parse_shape(shape))) * _common.np_dtype(dtype).itemsize
        self.gbps = nbytes * (1 if op == "forward" else 2) / seconds / 1e9
        self.copy_gbps = 2 * nbytes / copy_seconds / 1e9

    def track_gbps(self, shape, dtype, op):
        return self.gbps

    track_gbps.unit = "GB/s"

    def track_fraction_of_copy_floor(self, shape, dtype, op):
        return self.gbps / self.copy_gbps

    track_fraction_of_copy_floor.unit = "x copy GB/s"
